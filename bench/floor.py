#!/usr/bin/env python3
"""The floor under any durable, atomic apply of a 4 KiB file on a filesystem: write it
to a temp file, fsync, rename over the target (a reader sees it now), fsync the
directory. Prints the median and 99th percentile in ms until visible and until durable.

usage: floor.py DIR N
"""
import os
import sys
import time


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] * 1000


def main():
    d, n = sys.argv[1], int(sys.argv[2])
    os.makedirs(d, exist_ok=True)
    visible, durable = [], []
    temp = os.path.join(d, ".tmp")
    for i in range(n):
        data = os.urandom(4096)
        start = time.perf_counter()
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, os.path.join(d, f"f{i}"))
        visible.append(time.perf_counter() - start)
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        durable.append(time.perf_counter() - start)
    print(f"{pct(visible, 0.5):.3f} {pct(visible, 0.99):.3f} {pct(durable, 0.5):.3f} {pct(durable, 0.99):.3f}")


if __name__ == "__main__":
    main()
