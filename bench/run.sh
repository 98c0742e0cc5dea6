#!/usr/bin/env bash
# bench/run.sh: twinfs against the native file system it sits on, on a scratch
# ext4 image on a loop device. Each workload runs on native/ and on the twinfs
# volume mnt/ (mounted in place) alternately, ROUNDS times each; the medians and
# their ratio go to stdout as Markdown, progress to stderr. See docs/BENCHMARKS.md.
#
# Run as root:  sudo bench/run.sh
# Environment:  ROUNDS=3 FILE_MB=1024 NFILES=10000 IMAGE_SIZE=6G
#               BENCH_FALLBACK=1  also measure with --no-passthrough (a second table)
#               TWINFS_BIN=PATH   use this binary instead of `cargo build --release`
#               TMPDIR            where the image goes (default /tmp)
set -euo pipefail

ROUNDS=${ROUNDS:-3}
FILE_MB=${FILE_MB:-1024}
NFILES=${NFILES:-10000}
IMAGE_SIZE=${IMAGE_SIZE:-6G}
BENCH_FALLBACK=${BENCH_FALLBACK:-0}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
WORKLOAD=$HERE/workload.py

# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
die() { say "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (loop devices, mount, drop_caches, FUSE in place)"
for v in ROUNDS FILE_MB NFILES; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, not '${!v}'"
done

# --- dependencies -----------------------------------------------------------

install_missing fusermount3:fuse3 python3:python3 mkfs.ext4:e2fsprogs losetup:util-linux
build_twinfs
[[ -x $TWINFS_BIN ]] || die "$TWINFS_BIN is not an executable"

# --- scratch file system, and cleanup of everything this script sets up ------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/twinfs-bench.XXXXXX")
IMAGE=$WORK/scratch.img
SCRATCH=$WORK/scratch
NATIVE=$SCRATCH/native
VOLUME=$SCRATCH/mnt
CONFIG=$WORK/twinfs.toml
TIMES=$WORK/times.tsv
LOOP=
DAEMON_PID=
DAEMON_LOG=

# Whether $1 is a mount point of a file system whose type starts with $2.
mounted() {
    awk -v p="$1" -v t="$2" '$2 == p && index($3, t) == 1 { found = 1 } END { exit !found }' /proc/mounts
}

# Stops the daemon with SIGTERM as an admin would; a daemon that does not exit
# in 30 s is a twinfs bug, reported as such.
stop_daemon() {
    [[ -n $DAEMON_PID ]] || return 0
    local pid=$DAEMON_PID status=0
    DAEMON_PID=
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 300); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "twinfs (pid $pid) did not exit 30 s after SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        return 1
    fi
    wait "$pid" || status=$?
    if ((status != 0)); then
        say "twinfs (pid $pid) exited with status $status"
        return 1
    fi
    if mounted "$VOLUME" fuse; then
        say "twinfs exited but $VOLUME is still a FUSE mount"
        return 1
    fi
}

cleanup() {
    local status=$?
    set +e
    stop_daemon || status=1
    if ((status != 0)) && [[ -n $DAEMON_LOG && -s $DAEMON_LOG ]]; then
        say "last lines of the daemon log $DAEMON_LOG:"
        tail -n 30 "$DAEMON_LOG" >&2
    fi
    if mounted "$VOLUME" fuse; then
        say "lazily unmounting the leftover FUSE mount on $VOLUME"
        fusermount3 -u -z "$VOLUME"
    fi
    if mounted "$SCRATCH" ext4; then
        umount "$SCRATCH" || umount -l "$SCRATCH"
    fi
    [[ -n $LOOP ]] && losetup -d "$LOOP"
    if awk -v w="$WORK/" 'index($2, w) == 1 { found = 1 } END { exit !found }' /proc/mounts; then
        say "something is still mounted under $WORK; leaving it in place"
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "scratch ext4 image of $IMAGE_SIZE in $WORK"
mount_scratch "$IMAGE" "$IMAGE_SIZE" "$SCRATCH"
mkdir "$NATIVE" "$VOLUME" "$WORK/state"
cat >"$CONFIG" <<EOF
[node]
name = "bench"
state_dir = "$WORK/state"
# Port 0 so that the benchmark never collides with a real daemon's listener.
listen = "127.0.0.1:0"

[[volume]]
name = "bench"
path = "$VOLUME"
EOF

# --- the daemon --------------------------------------------------------------

# start_daemon LABEL [mount flags...]: mounts $VOLUME in place and waits until
# status reports it mounted with passthrough on (no flags) or off (--no-passthrough).
start_daemon() {
    local label=$1
    shift
    local want=true
    [[ " $* " == *" --no-passthrough "* ]] && want=false
    DAEMON_LOG=$WORK/daemon-$label.log
    "$TWINFS_BIN" --config "$CONFIG" mount "$@" 2>"$DAEMON_LOG" &
    DAEMON_PID=$!
    local json
    for _ in $(seq 300); do
        kill -0 "$DAEMON_PID" 2>/dev/null || die "twinfs mount exited during start-up"
        if json=$("$TWINFS_BIN" --config "$CONFIG" status --json 2>/dev/null) &&
            grep -q '"mounted": true' <<<"$json"; then
            grep -q "\"passthrough\": $want" <<<"$json" ||
                die "twinfs mounted with passthrough other than $want: $json"
            mounted "$VOLUME" fuse || die "status says mounted but $VOLUME is not a FUSE mount"
            say "twinfs mounted on $VOLUME (pid $DAEMON_PID, passthrough $want)"
            return 0
        fi
        sleep 0.1
    done
    die "twinfs did not report the volume mounted within 30 s"
}

# --- workloads ---------------------------------------------------------------

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

# run WORKLOAD PATH SIZE: runs one step of workload.py and prints its seconds.
run() {
    python3 "$WORKLOAD" "$@"
}

# The twinfs side of every run first checks that the daemon is alive and still
# mounted, so a crash is reported as one rather than as a slow or failed run.
check_daemon() {
    kill -0 "$DAEMON_PID" 2>/dev/null || die "the twinfs daemon died (see its log below)"
    mounted "$VOLUME" fuse || die "$VOLUME is no longer a FUSE mount"
}

record() { # record TABLE WORKLOAD SIDE ROUND SECONDS
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$TIMES"
    say "$(printf '%-22s %-10s %-6s round %s: %s s' "$@")"
}

# bench_set TABLE: every workload, native and twinfs alternating, ROUNDS times.
bench_set() {
    local table=$1 round side dir t
    local -A base=([native]=$NATIVE [twinfs]=$VOLUME)

    for round in $(seq "$ROUNDS"); do
        for side in native twinfs; do
            [[ $side == twinfs ]] && check_daemon
            dir=${base[$side]}
            sync
            t=$(run write "$dir/seq.dat" "$FILE_MB")
            record "$table" write "$side" "$round" "$t"
            rm "$dir/seq.dat"
        done
    done

    # One file per side for the reads, written and checked outside the timing.
    for side in native twinfs; do
        [[ $side == twinfs ]] && check_daemon
        run write "${base[$side]}/read.dat" "$FILE_MB" >/dev/null
        drop_caches
        run verify "${base[$side]}/read.dat" "$FILE_MB" >/dev/null
    done
    for round in $(seq "$ROUNDS"); do
        for side in native twinfs; do
            [[ $side == twinfs ]] && check_daemon
            drop_caches
            t=$(run read "${base[$side]}/read.dat" "$FILE_MB")
            record "$table" read_cold "$side" "$round" "$t"
        done
    done
    for round in $(seq "$ROUNDS"); do
        for side in native twinfs; do
            [[ $side == twinfs ]] && check_daemon
            run read "${base[$side]}/read.dat" "$FILE_MB" >/dev/null
            t=$(run read "${base[$side]}/read.dat" "$FILE_MB")
            record "$table" read_warm "$side" "$round" "$t"
        done
    done
    rm "$NATIVE/read.dat" "$VOLUME/read.dat"

    for round in $(seq "$ROUNDS"); do
        for side in native twinfs; do
            [[ $side == twinfs ]] && check_daemon
            dir=${base[$side]}/create.$round
            sync
            t=$(run create "$dir" "$NFILES")
            record "$table" create "$side" "$round" "$t"
            run remove "$dir" "$NFILES" >/dev/null
            sync
        done
    done

    # The files to stat are created once per side, through the mount on twinfs.
    for side in native twinfs; do
        run create "${base[$side]}/stat" "$NFILES" >/dev/null
    done
    sync
    for round in $(seq "$ROUNDS"); do
        for side in native twinfs; do
            [[ $side == twinfs ]] && check_daemon
            t=$(run stat "${base[$side]}/stat" "$NFILES")
            record "$table" stat "$side" "$round" "$t"
        done
    done
    for side in native twinfs; do
        run remove "${base[$side]}/stat" "$NFILES" >/dev/null
    done
    sync
}

start_daemon passthrough
bench_set "twinfs with passthrough"
stop_daemon || die "twinfs did not stop cleanly"

if [[ $BENCH_FALLBACK == 1 ]]; then
    start_daemon fallback --no-passthrough
    bench_set "twinfs without passthrough (--no-passthrough)"
    stop_daemon || die "twinfs did not stop cleanly"
fi

# --- report ------------------------------------------------------------------

backing=$(df --output=fstype "$WORK" | tail -n 1)
cat <<EOF
## twinfs benchmark, $(date -u +%Y-%m-%dT%H:%MZ)

- kernel $(uname -r), $(nproc) CPUs ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo))
- on a scratch ext4 file system ($IMAGE_SIZE image, mkfs.ext4 defaults, on loop device $LOOP, image file on $backing)
- native = a directory of that ext4; twinfs = another directory of it with twinfs mounted in place
- ROUNDS=$ROUNDS, alternating native and twinfs; medians shown; FILE_MB=$FILE_MB, NFILES=$NFILES
- ratio = native time / twinfs time (1.00× = as fast as native; higher is better for twinfs)

EOF
python3 "$HERE/report.py" "$TIMES" "$FILE_MB" "$NFILES"
