#!/usr/bin/env bash
# bench/replication.sh: how long a change takes to be readable on the other node,
# twinfs (two daemons, QUIC on loopback) against lsyncd (inotify, rsync to an rsync
# daemon on loopback with TCP_NODELAY, delay = 0), on a scratch ext4 image on a loop
# device. Prints a Markdown table: p50 and p99 in ms over N changes of a 4 KiB file.
#
# Run as root:  bench/replication.sh          Environment: N=1000 ROUNDS=3 TWINFS_BIN=PATH
set -euo pipefail

N=${N:-1000}
ROUNDS=${ROUNDS:-3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"

[[ $(id -u) -eq 0 ]] || { say "must run as root"; exit 1; }
install_missing fusermount3:fuse3 lsyncd:lsyncd rsync:rsync python3:python3 mkfs.ext4:e2fsprogs
build_twinfs

WORK=$(mktemp -d /tmp/twinfs-replbench.XXXXXX)
S=$WORK/scratch
PIDS=()
LOOP=
cleanup() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 1
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    for m in "$S/a/vol" "$S/b/vol"; do
        grep -q " $m fuse" /proc/mounts && fusermount3 -u -z "$m" 2>/dev/null || true
    done
    release_scratch "$S"
    rm -rf "$WORK"
}
trap cleanup EXIT

mount_scratch "$WORK/scratch.img" 2G "$S"
mkdir -p "$S"/lsyncd/{src,dst}

# --- twinfs: two nodes on loopback ------------------------------------------------
configure_pair "$S" a 127.0.0.1:7851 b 127.0.0.2:7852
for n in b a; do
    "$TWINFS_BIN" --config "$S/$n/twinfs.toml" mount 2> "$WORK/$n.log" &
    PIDS+=($!)
    for _ in $(seq 100); do
        "$TWINFS_BIN" --config "$S/$n/twinfs.toml" status >/dev/null 2>&1 && break
        sleep 0.1
    done
done

# --- lsyncd: inotify + rsync to an rsync daemon, its lowest-latency tuning ---------
cat > "$WORK/rsyncd.conf" <<CONF
port = 8730
address = 127.0.0.1
use chroot = no
[bench]
path = $S/lsyncd/dst
read only = no
uid = root
gid = root
CONF
rsync --daemon --no-detach --config="$WORK/rsyncd.conf" > "$WORK/rsyncd.out" 2>&1 &
PIDS+=($!)
cat > "$WORK/lsyncd.lua" <<LUA
settings { nodaemon = true, logfile = "$WORK/lsyncd.log", insist = true }
sync {
    default.rsync,
    source = "$S/lsyncd/src/",
    target = "rsync://127.0.0.1:8730/bench/",
    delay = 0,
    rsync = { _extra = { "--sockopts=TCP_NODELAY" } },
}
LUA
sleep 1
lsyncd "$WORK/lsyncd.lua" > "$WORK/lsyncd.out" 2>&1 &
PIDS+=($!)
sleep 2

# --- measure, alternating --------------------------------------------------------
declare -a T50 T99 L50 L99 F50 F99 D50 D99
for r in $(seq "$ROUNDS"); do
    read -r v50 v99 d50 d99 < <(python3 "$HERE/floor.py" "$S/floor/r$r" "$N")
    say "round $r reference: renamed p50 $v50 ms, p99 $v99 ms; durable p50 $d50 ms, p99 $d99 ms"
    F50+=("$v50"); F99+=("$v99"); D50+=("$d50"); D99+=("$d99")
    read -r p50 p99 < <(python3 "$HERE/latency.py" "$S/a/vol" "$S/b/vol" "$N" "r$r")
    say "round $r twinfs: p50 $p50 ms, p99 $p99 ms"
    T50+=("$p50"); T99+=("$p99")
    read -r p50 p99 < <(python3 "$HERE/latency.py" "$S/lsyncd/src" "$S/lsyncd/dst" "$N" "r$r")
    say "round $r lsyncd: p50 $p50 ms, p99 $p99 ms"
    L50+=("$p50"); L99+=("$p99")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "## Replication latency, $(date -u +%Y-%m-%dT%H:%MZ)"
echo
echo "- close() of a 4 KiB file on one side until the same bytes are readable on the other; $N changes per round, $ROUNDS rounds alternating, medians of the rounds"
echo "- kernel $(uname -r), $(nproc) CPUs; both tools write to a scratch ext4 image on a loop device"
echo "- reference: no replication, just a durable atomic replace of the file (python, same image, same rounds); twinfs makes a file readable before this and durable in the background, so this is not a floor for it"
echo "- twinfs: two daemons, QUIC over loopback, durability async; lsyncd $(lsyncd --version 2>&1 | head -1 | awk '{print $2}'): inotify, delay = 0, rsync to an rsync daemon on loopback with --sockopts=TCP_NODELAY"
echo
echo "| tool | p50 (ms) | p99 (ms) |"
echo "|---|---|---|"
echo "| twinfs | $(median "${T50[@]}") | $(median "${T99[@]}") |"
echo "| lsyncd + rsync daemon | $(median "${L50[@]}") | $(median "${L99[@]}") |"
echo "| reference: write, fsync, rename on the same image | $(median "${F50[@]}") | $(median "${F99[@]}") |"
echo "| reference, then fsync of the directory | $(median "${D50[@]}") | $(median "${D99[@]}") |"
