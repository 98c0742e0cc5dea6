#!/usr/bin/env bash
# bench/idle.sh: what two idle daemons cost. Starts an active and a standby on
# loopback with 100 small files, waits for the full sync, lets them idle (nothing
# changes) and prints the CPU seconds each used in the minute from 150 s to 210 s
# after it: past the session's 120 s stall timeout, whose deadline once made an
# idle active spin.
#
# Run as root:  bench/idle.sh
# Environment:  TWINFS_BIN=PATH (default: cargo build --release)
#               IDLE_FROM=150 IDLE_FOR=60 (seconds)  PORT=7891
set -euo pipefail

IDLE_FROM=${IDLE_FROM:-150}
IDLE_FOR=${IDLE_FOR:-60}
PORT=${PORT:-7891}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"

[[ $(id -u) -eq 0 ]] || { say "must run as root"; exit 1; }
install_missing fusermount3:fuse3 bc:bc
build_twinfs

WORK=$(mktemp -d /tmp/twinfs-idle.XXXXXX)
A= B=
cleanup() {
    for p in $A $B; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 1
    for p in $A $B; do kill -KILL "$p" 2>/dev/null || true; done
    for m in "$WORK/a/vol" "$WORK/b/vol"; do
        grep -q " $m fuse" /proc/mounts && fusermount3 -u -z "$m" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

configure_pair "$WORK" a "127.0.0.1:$PORT" b "127.0.0.2:$((PORT + 1))"
for i in $(seq 100); do echo "key$i = $i" > "$WORK/a/vol/f$i.conf"; done
"$TWINFS_BIN" --config "$WORK/a/twinfs.toml" mount > /dev/null 2> "$WORK/a.log" &
A=$!
"$TWINFS_BIN" --config "$WORK/b/twinfs.toml" mount > /dev/null 2> "$WORK/b.log" &
B=$!
for _ in $(seq 600); do
    [[ $("$TWINFS_BIN" --config "$WORK/b/twinfs.toml" status --json 2>/dev/null) == *'"full_sync": "done"'* ]] && break
    sleep 0.1
done
[[ $("$TWINFS_BIN" --config "$WORK/b/twinfs.toml" status --json 2>/dev/null) == *'"full_sync": "done"'* ]] \
    || { say "no full sync within 60 s"; cat "$WORK/a.log" "$WORK/b.log" >&2; exit 1; }
say "in sync; idling ${IDLE_FROM} s, then measuring ${IDLE_FOR} s"
cpu() { awk '{printf "%.2f", ($14 + $15) / 100}' "/proc/$1/stat"; }
sleep "$IDLE_FROM"
a0=$(cpu "$A"); b0=$(cpu "$B")
sleep "$IDLE_FOR"
a1=$(cpu "$A"); b1=$(cpu "$B")
echo "CPU seconds used in $IDLE_FOR s of idling, from $IDLE_FROM s after the full sync:" \
    "active $(echo "$a1 - $a0" | bc), standby $(echo "$b1 - $b0" | bc)"
