#!/usr/bin/env bash
# bench/fullsync.sh: initial full sync, a 1 MiB change in a 512 MiB file, and the
# daemon's memory with 100,000 files; twinfs (two daemons, QUIC on loopback) against
# `rsync -a` to an rsync daemon on loopback (plaintext) and rsync over ssh on loopback
# (encrypted, like twinfs), and a local `cp -a` + `sync -f` (the floor for a durable
# copy), all on one scratch ext4 image on a loop device.
# Prints Markdown tables.
#
# Run as root:  bench/fullsync.sh
# Environment:  ROUNDS=3  SMALL=10000 BIG_MIB=512 MIXED=1000  RSS_FILES=100000
#               TWINFS_BIN=PATH (default: cargo build --release)
set -euo pipefail

ROUNDS=${ROUNDS:-3}
SMALL=${SMALL:-10000}
BIG_MIB=${BIG_MIB:-512}
MIXED=${MIXED:-1000}
RSS_FILES=${RSS_FILES:-100000}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"

[[ $(id -u) -eq 0 ]] || { say "must run as root"; exit 1; }
install_missing fusermount3:fuse3 rsync:rsync python3:python3 mkfs.ext4:e2fsprogs \
    sshd:openssh-server ssh:openssh-client
build_twinfs

WORK=$(mktemp -d /tmp/twinfs-syncbench.XXXXXX)
S=$WORK/scratch
declare -A PID
OTHER_PIDS=()
LOOP=
stop_node() {
    local n=$1
    if [[ -n ${PID[$n]:-} ]]; then
        kill -TERM "${PID[$n]}" 2>/dev/null || true
        wait "${PID[$n]}" 2>/dev/null || true
        PID[$n]=
    fi
}
cleanup() {
    for n in "${!PID[@]}"; do [[ -n ${PID[$n]} ]] && kill -TERM "${PID[$n]}" 2>/dev/null || true; done
    for p in "${OTHER_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 1
    for n in "${!PID[@]}"; do [[ -n ${PID[$n]} ]] && kill -KILL "${PID[$n]}" 2>/dev/null || true; done
    for p in "${OTHER_PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    # (|| true: with pipefail, a grep that finds nothing would end the trap here.)
    { grep " fuse.twinfs " /proc/mounts | awk '{print $2}' | grep "^$S/" || true; } | while read -r m; do
        fusermount3 -u -z "$m" 2>/dev/null || true
    done
    release_scratch "$S"
    rm -rf "$WORK"
}
trap cleanup EXIT

mount_scratch "$WORK/scratch.img" 12G "$S"

say "making the data set: $SMALL x 4 KiB, one $BIG_MIB MiB file, $MIXED mixed"
mkdir -p "$S/src" "$S/rd" "$S/rs"
python3 "$HERE/mkdata.py" "$S/src" "$SMALL" "$BIG_MIB" "$MIXED"
TOTAL_BYTES=$(du -sb "$S/src" | cut -f1)
TOTAL_FILES=$(find "$S/src" -type f | wc -l)

# --- twinfs: node a (active, a copy of the data), node b (standby, empty) ---------
# nodes: a/b for the sync benchmark, ra/rb for the memory one.
start_node() {
    local n=$1
    "$TWINFS_BIN" --config "$S/$n/twinfs.toml" mount 2>> "$WORK/$n.log" &
    PID[$n]=$!
}
status() { "$TWINFS_BIN" --config "$S/$1/twinfs.toml" status --json 2>/dev/null; }
# peer FIELD of node N's first volume, or nothing.
peer_field() {
    status "$1" | python3 -c "import json,sys; print(json.load(sys.stdin)['volumes'][0]['peers'][0]['$2'])" 2>/dev/null || true
}
wait_synced() { # until node $1 (a standby) reports its full sync done
    # (One short-lived process per poll: a Python parser here took a tenth of the two
    # cores away from the daemons being timed.)
    local n=$1
    until [[ $(status "$n") == *'"full_sync": "done"'* ]]; do sleep 0.02; done
}
wait_up() {
    for _ in $(seq 200); do status "$1" >/dev/null && return; sleep 0.05; done
    say "node $1 did not start"; cat "$WORK/$1.log" >&2; exit 1
}
wire() { echo $(($(peer_field a bytes_sent) + $(peer_field a bytes_received))); }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

configure_pair "$S" a 127.0.0.1:7861 b 127.0.0.2:7862
cp -a "$S/src/." "$S/a/vol/"
start_node a
wait_up a

# --- rsync daemon and sshd on loopback --------------------------------------------
cat > "$WORK/rsyncd.conf" <<CONF
port = 8731
address = 127.0.0.1
use chroot = no
[bench]
path = $S/rd
read only = no
uid = root
gid = root
CONF
rsync --daemon --no-detach --config="$WORK/rsyncd.conf" > "$WORK/rsyncd.out" 2>&1 &
OTHER_PIDS+=($!)
ssh-keygen -q -t ed25519 -N '' -f "$WORK/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/id"
cp "$WORK/id.pub" "$WORK/authorized_keys"
chmod 600 "$WORK/authorized_keys"
mkdir -p /run/sshd
cat > "$WORK/sshd_config" <<CONF
Port 2231
ListenAddress 127.0.0.1
HostKey $WORK/host_key
AuthorizedKeysFile $WORK/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
UsePAM no
StrictModes no
PidFile $WORK/sshd.pid
CONF
/usr/sbin/sshd -D -f "$WORK/sshd_config" -E "$WORK/sshd.log" &
OTHER_PIDS+=($!)
SSH="ssh -p 2231 -i $WORK/id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes"
sleep 1
CIPHER=$($SSH -v root@127.0.0.1 true 2>&1 | sed -n 's/.*kex: client->server cipher: \([^ ]*\).*/\1/p' | head -1)

# Seconds taken by a command.
timed() {
    local t0 t1
    t0=$(date +%s.%N)
    "$@" > "$WORK/last.out"
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc -l
}
stats_bytes() { # total bytes sent + received from rsync --stats output
    awk '/^Total bytes sent:/ {gsub(",","",$4); s=$4} /^Total bytes received:/ {gsub(",","",$4); r=$4} END {print s + r}' "$WORK/last.out"
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# --- (b) initial full sync, alternating tools each round -------------------------
declare -a TW TWB RD RDF RS CP
for r in $(seq "$ROUNDS"); do
    stop_node b
    rm -rf "$S/b/vol" "$S/b/state/volumes" && mkdir -p "$S/b/vol"
    drop_caches
    t0=$(date +%s.%N)
    start_node b
    wait_synced b
    t1=$(date +%s.%N)
    t=$(echo "$t1 - $t0" | bc -l)
    TW+=("$t"); TWB+=("$(wire)")
    say "round $r twinfs full sync: $t s, $(wire) bytes"

    find "$S/rd" -mindepth 1 -delete
    drop_caches
    t=$(timed rsync -a --stats "$S/src/" rsync://127.0.0.1:8731/bench/)
    RD+=("$t"); RDB=$(stats_bytes)
    say "round $r rsync daemon: $t s"

    find "$S/rd" -mindepth 1 -delete
    drop_caches
    t=$(timed rsync -a --fsync --stats "$S/src/" rsync://127.0.0.1:8731/bench/)
    RDF+=("$t")
    say "round $r rsync daemon --fsync: $t s"

    find "$S/rs" -mindepth 1 -delete
    drop_caches
    t=$(timed rsync -a --stats -e "$SSH" "$S/src/" "root@127.0.0.1:$S/rs/")
    RS+=("$t"); RSB=$(stats_bytes)
    say "round $r rsync over ssh: $t s"

    # The floor for a durable copy on this disk: a local cp -a, then syncfs of the
    # image (no network, no encryption, no per-file fsync).
    rm -rf "$S/cp"
    drop_caches
    t=$(timed sh -c "cp -a '$S/src' '$S/cp' && sync -f '$S/cp'")
    CP+=("$t")
    say "round $r cp -a + sync: $t s"
done
rm -rf "$S/cp"
# The trees match (twinfs, and the last rsync over ssh).
diff -r "$S/src" "$S/b/vol" > /dev/null || { say "twinfs standby differs from the source"; exit 1; }
diff -r "$S/src" "$S/rs" > /dev/null || { say "rsync-over-ssh copy differs from the source"; exit 1; }
find "$S/rd" -mindepth 1 -delete
rsync -a "$S/src/" rsync://127.0.0.1:8731/bench/

# --- (c) 1 MiB changed in the middle of the big file ------------------------------
declare -a DT DB DRD DRDB DRS DRSB
BIG=images/big.img
# Every copy of the big file in the page cache, as on nodes that use it: the full
# syncs above dropped the caches, and a first round reading 512 MiB cold on both
# sides measured the disk (twinfs 4.9 s, rsync 1.4 s), not the delta.
cat "$S/a/vol/$BIG" "$S/b/vol/$BIG" "$S/src/$BIG" "$S/rd/$BIG" "$S/rs/$BIG" > /dev/null
OFF=$((BIG_MIB / 2 * 1048576 + 12345))
for r in $(seq "$ROUNDS"); do
    # Each tool starts with nothing left to write back: the rsync runs before leave
    # gigabytes of dirty pages, whose writeback made the first twinfs round take 5 s
    # instead of 2.
    sync
    before=$(wire)
    t=$(python3 "$HERE/delta.py" "$S/a/vol/$BIG" "$S/b/vol/$BIG" "$OFF" "$r")
    sleep 0.5
    DT+=("$t"); DB+=($(($(wire) - before)))
    say "round $r twinfs delta: $t s, ${DB[-1]} bytes"

    python3 "$HERE/delta.py" "$S/src/$BIG" /dev/null "$OFF" "$r" --no-wait
    sync
    t=$(timed rsync -a --stats "$S/src/" rsync://127.0.0.1:8731/bench/)
    DRD+=("$t"); DRDB+=("$(stats_bytes)")
    sync
    t=$(timed rsync -a --stats -e "$SSH" "$S/src/" "root@127.0.0.1:$S/rs/")
    DRS+=("$t"); DRSB+=("$(stats_bytes)")
    say "round $r rsync delta: daemon ${DRD[-1]} s ${DRDB[-1]} B, ssh ${DRS[-1]} s ${DRSB[-1]} B"
done
cmp "$S/a/vol/$BIG" "$S/b/vol/$BIG" || { say "twinfs big file differs after the deltas"; exit 1; }
cmp "$S/src/$BIG" "$S/rs/$BIG" || { say "rsync big file differs after the deltas"; exit 1; }
stop_node b
stop_node a

# --- (d) memory with many files -------------------------------------------------
say "memory: $RSS_FILES files"
configure_pair "$S" ra 127.0.0.1:7863 rb 127.0.0.2:7864
python3 - "$S/ra/vol" "$RSS_FILES" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, f"d{i // 1000:03d}")
    if i % 1000 == 0:
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"file-{i:06d}.conf"), "w") as f:
        f.write(f"key{i} = value{i}\n")
PY
rss() { awk '/^VmRSS/ {print int($2/1024)}' "/proc/$1/status"; }
hwm() { awk '/^VmHWM/ {print int($2/1024)}' "/proc/$1/status"; }
start_node ra
wait_up ra
t0=$(date +%s.%N)
start_node rb
wait_synced rb
t1=$(date +%s.%N)
RSS_SYNC=$(echo "$t1 - $t0" | bc -l)
sleep 2
RSS_A=$(rss "${PID[ra]}"); HWM_A=$(hwm "${PID[ra]}")
RSS_B=$(rss "${PID[rb]}"); HWM_B=$(hwm "${PID[rb]}")
# And after a restart of both, with the hash cache warm.
stop_node rb; stop_node ra
start_node ra; wait_up ra
start_node rb; wait_synced rb
sleep 2
RSS_A2=$(rss "${PID[ra]}"); HWM_A2=$(hwm "${PID[ra]}")
RSS_B2=$(rss "${PID[rb]}"); HWM_B2=$(hwm "${PID[rb]}")
stop_node rb; stop_node ra

fmt() { printf '%.2f' "$1"; }
ratio() { echo "scale=2; $1 / $2" | bc -l; }
echo "## Full sync, delta and memory, $(date -u +%Y-%m-%dT%H:%MZ)"
echo
echo "- kernel $(uname -r), $(nproc) CPUs; every tool reads and writes a scratch ext4 image on a loop device (page cache dropped before each full sync)"
echo "- data: $TOTAL_FILES files, $TOTAL_BYTES bytes ($SMALL x 4 KiB, one $BIG_MIB MiB file, $MIXED files of 100 B-1 MiB), incompressible"
echo "- twinfs: two daemons on loopback, QUIC with TLS 1.3; timed from starting the empty standby's daemon until its status says the full sync is done (every file fsync'd); the active was running with its hash cache warm"
echo "- rsync $(rsync --version | head -1 | awk '{print $3}'): \`rsync -a\` to an rsync daemon on 127.0.0.1 (plaintext, no fsync unless --fsync), and over ssh on 127.0.0.1 (cipher $CIPHER)"
echo "- $ROUNDS rounds alternating the tools; medians"
echo
echo "### (b) initial full sync"
echo
echo "| tool | seconds | twinfs ÷ tool | rounds |"
echo "|---|---|---|---|"
T=$(median "${TW[@]}")
echo "| twinfs | $(fmt "$T") | 1.00 | ${TW[*]} |"
echo "| rsync daemon | $(fmt "$(median "${RD[@]}")") | $(ratio "$T" "$(median "${RD[@]}")") | ${RD[*]} |"
echo "| rsync daemon --fsync | $(fmt "$(median "${RDF[@]}")") | $(ratio "$T" "$(median "${RDF[@]}")") | ${RDF[*]} |"
echo "| rsync over ssh | $(fmt "$(median "${RS[@]}")") | $(ratio "$T" "$(median "${RS[@]}")") | ${RS[*]} |"
echo "| local \`cp -a\` + \`sync -f\` (durable, no network) | $(fmt "$(median "${CP[@]}")") | $(ratio "$T" "$(median "${CP[@]}")") | ${CP[*]} |"
echo
echo "Bytes on the wire (application level): twinfs $(median "${TWB[@]}"), rsync daemon $RDB, rsync over ssh $RSB."
echo
echo "### (c) 1 MiB changed in the middle of the $BIG_MIB MiB file"
echo
echo "(Every copy of the big file read into the page cache before the rounds; \`sync\` before each run.)"
echo
echo "| tool | seconds | bytes sent + received | rounds (s) |"
echo "|---|---|---|---|"
echo "| twinfs (close until readable on the standby) | $(fmt "$(median "${DT[@]}")") | $(median "${DB[@]}") | ${DT[*]} |"
echo "| rsync daemon (whole run) | $(fmt "$(median "${DRD[@]}")") | $(median "${DRDB[@]}") | ${DRD[*]} |"
echo "| rsync over ssh (whole run) | $(fmt "$(median "${DRS[@]}")") | $(median "${DRSB[@]}") | ${DRS[*]} |"
echo
echo "### (d) daemon memory with $RSS_FILES files"
echo
echo "| | active RSS / peak (MiB) | standby RSS / peak (MiB) |"
echo "|---|---|---|"
echo "| after the first full sync ($(fmt "$RSS_SYNC") s) | $RSS_A / $HWM_A | $RSS_B / $HWM_B |"
echo "| after a restart of both (hash cache warm) | $RSS_A2 / $HWM_A2 | $RSS_B2 / $HWM_B2 |"
