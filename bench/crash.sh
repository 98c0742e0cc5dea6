#!/usr/bin/env bash
# bench/crash.sh: how often a daemon killed with SIGKILL leaves its volume's
# directory behind as a dead mount ("Transport endpoint is not connected").
# Each round mounts a one-file volume, writes a file through the mount, kills the
# daemon with SIGKILL and gives the directory 5 s to be a plain directory again,
# with the file there. BUSY busy loops run beside it all along: a loaded machine is
# where cleaning up after a dead daemon used to lose a race.
#
# Run as root:  bench/crash.sh
# Environment:  TWINFS_BIN=PATH (default: cargo build --release)
#               ROUNDS=200  BUSY=3 (busy loops beside the rounds)
# Prints:       crash: ROUNDS rounds, N dead mounts left
set -euo pipefail

ROUNDS=${ROUNDS:-200}
BUSY=${BUSY:-3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"

[[ $(id -u) -eq 0 ]] || { say "must run as root"; exit 1; }
install_missing fusermount3:fuse3
build_twinfs

WORK=$(mktemp -d /tmp/twinfs-crash.XXXXXX)
LOAD=()
DAEMON=
cleanup() {
    for p in "${LOAD[@]}" $DAEMON; do kill -KILL "$p" 2>/dev/null || true; done
    grep -q " $WORK/vol fuse" /proc/mounts && umount -l "$WORK/vol" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

mkdir "$WORK/vol"
echo "10.0.0.1 cmm-a" > "$WORK/vol/hosts"
cat > "$WORK/twinfs.toml" <<EOF
[node]
name = "crash"
listen = "127.0.0.1:0"
state_dir = "$WORK/state"

[[volume]]
name = "vol"
path = "$WORK/vol"
EOF
for _ in $(seq "$BUSY"); do
    (while :; do :; done) &
    LOAD+=($!)
    disown $!
done

mounted() { grep -q " $WORK/vol fuse.twinfs " /proc/mounts; }
dead=0
for round in $(seq "$ROUNDS"); do
    "$TWINFS_BIN" --config "$WORK/twinfs.toml" mount 2> "$WORK/daemon.log" &
    DAEMON=$!
    for _ in $(seq 600); do
        mounted && "$TWINFS_BIN" --config "$WORK/twinfs.toml" status > /dev/null 2>&1 && break
        sleep 0.05
    done
    mounted || { say "round $round: the daemon did not mount"; cat "$WORK/daemon.log" >&2; exit 1; }
    echo "round $round" > "$WORK/vol/written"
    kill -KILL "$DAEMON"
    wait "$DAEMON" 2>/dev/null || true
    DAEMON=
    for _ in $(seq 100); do
        mounted || break
        sleep 0.05
    done
    if mounted; then
        dead=$((dead + 1))
        say "round $round: a dead mount was left: $(ls "$WORK/vol" 2>&1 | head -1)"
        umount -l "$WORK/vol"
    elif [[ $(cat "$WORK/vol/written") != "round $round" ]]; then
        say "round $round: the file written before the kill is not there"
        exit 1
    fi
done
echo "crash: $ROUNDS rounds, $dead dead mounts left"
