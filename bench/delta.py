#!/usr/bin/env python3
"""Writes 1 MiB of new bytes at OFFSET into SRC (open, seek, write, close), then polls
DST until the same bytes are readable there at OFFSET. Prints the seconds from the
close to then. With --no-wait it only writes (for tools that are run afterwards).

usage: delta.py SRC DST OFFSET SEED [--no-wait]
"""
import os
import random
import sys
import time


def main():
    src, dst, offset, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    data = random.Random(seed).randbytes(1 << 20)
    with open(src, "r+b") as f:
        f.seek(offset)
        f.write(data)
    start = time.perf_counter()
    if "--no-wait" in sys.argv:
        return
    while True:
        try:
            with open(dst, "rb") as f:
                f.seek(offset)
                if f.read(len(data)) == data:
                    break
        except FileNotFoundError:
            pass
        if time.perf_counter() - start > 120:
            sys.exit("the change did not arrive within 120 s")
        time.sleep(0.001)
    print(f"{time.perf_counter() - start:.4f}")


if __name__ == "__main__":
    main()
