#!/usr/bin/env python3
"""Fills DIR with the full-sync benchmark's data set, deterministically:
10,000 files of 4 KiB in 100 directories, one 512 MiB file, and 1,000 files of mixed
sizes (100 B to 1 MiB, log-uniform) in 10 directories. Incompressible bytes.

usage: mkdata.py DIR [SMALL BIG_MIB MIXED]
"""
import os
import random
import sys


def main():
    root = sys.argv[1]
    small = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    big_mib = int(sys.argv[3]) if len(sys.argv) > 3 else 512
    mixed = int(sys.argv[4]) if len(sys.argv) > 4 else 1_000
    rng = random.Random(42)
    for i in range(small):
        d = os.path.join(root, "small", f"d{i // 100:03d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:05d}.conf"), "wb") as f:
            f.write(rng.randbytes(4096))
    if big_mib:
        os.makedirs(os.path.join(root, "images"), exist_ok=True)
        with open(os.path.join(root, "images", "big.img"), "wb") as f:
            for _ in range(big_mib):
                f.write(rng.randbytes(1 << 20))
    for i in range(mixed):
        d = os.path.join(root, "mixed", f"m{i // 100:02d}")
        os.makedirs(d, exist_ok=True)
        size = int(10 ** (2 + 4 * rng.random()))
        with open(os.path.join(d, f"x{i:04d}.dat"), "wb") as f:
            f.write(rng.randbytes(size))


if __name__ == "__main__":
    main()
