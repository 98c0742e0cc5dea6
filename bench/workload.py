#!/usr/bin/env python3
"""The timed workloads of bench/run.sh: each subcommand does one workload in a
directory and prints the seconds its timed part took (and nothing else on stdout).

Kept to the standard library so the benchmark needs nothing but python3.
Data written by `write` is a seeded pattern with the chunk number stamped in,
so `verify` can tell wrong, shifted or missing data from a slow read.
"""

import os
import random
import shutil
import sys
import time

CHUNK = 1 << 20
FILE_SIZE = 4096


def pattern():
    return random.Random(0x7F5).randbytes(CHUNK)


def stamp(buf, i):
    # The chunk number makes every chunk distinct, so data read back at the wrong
    # offset fails `verify`; stamping in place keeps copies out of the timed loop.
    buf[0:8] = i.to_bytes(8, "little")
    return buf


def write(path, mb):
    """Sequential write of `mb` MiB, fsync before close; timed end to end."""
    buf = bytearray(pattern())
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(mb):
            view = memoryview(stamp(buf, i))
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def read(path, mb):
    """Sequential read of the whole file in 1 MiB reads; checks the length only."""
    buf = bytearray(CHUNK)
    total = 0
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            n = os.readv(fd, [buf])
            if n == 0:
                break
            total += n
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - start
    if total != mb * CHUNK:
        sys.exit(f"{path}: read {total} bytes, expected {mb * CHUNK}")
    return elapsed


def verify(path, mb):
    """Untimed: the file holds exactly what `write` wrote."""
    expected = bytearray(pattern())
    with open(path, "rb", buffering=0) as f:
        for i in range(mb):
            data = f.read(CHUNK)
            if data != stamp(expected, i):
                sys.exit(f"{path}: MiB {i} differs from what was written")
        if f.read(1):
            sys.exit(f"{path}: longer than {mb} MiB")
    return 0.0


def names(directory, n):
    return [os.path.join(directory, f"f{i:06d}") for i in range(n)]


def create(directory, n):
    """Create, write 4 KiB and close `n` new files in a new directory; only the
    loop is timed."""
    os.mkdir(directory)
    paths = names(directory, n)
    data = b"x" * FILE_SIZE
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    start = time.perf_counter()
    for p in paths:
        fd = os.open(p, flags, 0o644)
        os.write(fd, data)
        os.close(fd)
    elapsed = time.perf_counter() - start
    count = len(os.listdir(directory))
    if count != n:
        sys.exit(f"{directory}: {count} entries after creating {n}")
    return elapsed


def stat(directory, n):
    """lstat every file once to warm the caches, then time a second pass."""
    paths = names(directory, n)
    for p in paths:
        os.lstat(p)
    start = time.perf_counter()
    for p in paths:
        st = os.lstat(p)
    elapsed = time.perf_counter() - start
    if st.st_size != FILE_SIZE:
        sys.exit(f"{paths[-1]}: size {st.st_size}, expected {FILE_SIZE}")
    return elapsed


def remove(directory, _n):
    shutil.rmtree(directory)
    return 0.0


WORKLOADS = {
    "write": write,
    "read": read,
    "verify": verify,
    "create": create,
    "stat": stat,
    "remove": remove,
}


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in WORKLOADS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(WORKLOADS)}}} PATH SIZE")
    name, path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print(f"{WORKLOADS[name](path, size):.6f}")


if __name__ == "__main__":
    main()
