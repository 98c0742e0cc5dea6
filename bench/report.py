#!/usr/bin/env python3
"""Turns the per-round times bench/run.sh records into the Markdown tables it prints.

Input (the file named by the first argument): one line per timed run,
`table<TAB>workload<TAB>side<TAB>round<TAB>seconds`, side being `native` or `twinfs`.
The ratio is native time / twinfs time of the medians, so 1.0 means twinfs is
as fast as native ext4 and 0.5 means it takes twice as long.
"""

import statistics
import sys
from collections import defaultdict

# workload key -> (description, unit of work per run, unit name, target ratio)
WORKLOADS = [
    ("write", "sequential write {mb} MiB + fsync", "mb", "MiB/s", 0.95),
    ("read_cold", "sequential read {mb} MiB, cold cache", "mb", "MiB/s", 0.95),
    ("read_warm", "sequential read {mb} MiB, warm cache", "mb", "MiB/s", 0.95),
    ("create", "create + write 4 KiB + close, {n} files", "n", "files/s", 0.80),
    ("stat", "lstat {n} files, warm", "n", "stat/s", 0.90),
]


def rate(amount, seconds):
    r = amount / seconds
    return f"{r / 1000:.0f}k" if r >= 100_000 else f"{r:.0f}"


def cell(seconds, amount, unit):
    return f"{seconds:.3f} s ({rate(amount, seconds)} {unit})"


def main():
    if len(sys.argv) != 4:
        sys.exit(f"usage: {sys.argv[0]} TIMES.tsv FILE_MB NFILES")
    mb, n = int(sys.argv[2]), int(sys.argv[3])
    times = defaultdict(list)
    tables = []
    with open(sys.argv[1]) as f:
        for line in f:
            table, workload, side, _round, seconds = line.rstrip("\n").split("\t")
            if table not in tables:
                tables.append(table)
            times[table, workload, side].append(float(seconds))

    for table in tables:
        print(f"### {table}\n")
        print("| workload | native (median) | twinfs (median) | ratio native/twinfs | target | met |")
        print("|---|---|---|---|---|---|")
        details = []
        for key, desc, per, unit, target in WORKLOADS:
            native, twinfs = times.get((table, key, "native")), times.get((table, key, "twinfs"))
            if not native or not twinfs:
                continue
            amount = mb if per == "mb" else n
            nat, tw = statistics.median(native), statistics.median(twinfs)
            ratio = nat / tw
            print(
                f"| {desc.format(mb=mb, n=n)} | {cell(nat, amount, unit)} | {cell(tw, amount, unit)} "
                f"| {ratio:.2f}× | ≥ {target:.2f}× | {'yes' if ratio >= target else '**no**'} |"
            )
            details.append(
                f"- {key}: native {' '.join(f'{t:.3f}' for t in native)}; "
                f"twinfs {' '.join(f'{t:.3f}' for t in twinfs)}"
            )
        print("\nPer-round times in seconds, in the order they ran:\n")
        print("\n".join(details))
        print()


if __name__ == "__main__":
    main()
