#!/usr/bin/env python3
"""Replication latency: write a 4 KiB file in SRC (write + close), then poll DST until
the same bytes are readable there. Prints the median and the 99th percentile in
milliseconds over N changes (a new file each time: rsync skips a same-size rewrite within the same second).

usage: latency.py SRC DST N [TAG]   (TAG keeps rounds apart: names and bytes differ)
"""
import os
import sys
import time


def main():
    src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tag = sys.argv[4] if len(sys.argv) > 4 else "0"
    latencies = []
    for i in range(n):
        name = f"lat-{tag}-{i}"
        data = (f"{tag[:2]:>2}{i:06d}" * 512).encode()  # 4096 bytes, distinct per change
        with open(os.path.join(src, name), "wb") as f:
            f.write(data)
        start = time.perf_counter()
        target = os.path.join(dst, name)
        while True:
            try:
                with open(target, "rb") as f:
                    if f.read() == data:
                        break
            except FileNotFoundError:
                pass
            if time.perf_counter() - start > 10:
                sys.exit(f"change {i} did not arrive within 10 s")
        latencies.append(time.perf_counter() - start)
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    print(f"{p50:.3f} {p99:.3f}")


if __name__ == "__main__":
    main()
