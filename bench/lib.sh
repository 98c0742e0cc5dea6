# bench/lib.sh: what the benchmark scripts share. Sourced, not run; expects ROOT (the
# repository) to be set.

say() { printf 'bench: %s\n' "$*" >&2; }

# Installs the Debian packages of the missing commands; arguments are COMMAND:PACKAGE
# pairs (a command in /usr/sbin counts as present).
install_missing() {
    local pair missing=()
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null || [[ -x /usr/sbin/${pair%%:*} ]] || missing+=("${pair#*:}")
    done
    if ((${#missing[@]})); then
        say "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
    fi
}

# Sets TWINFS_BIN to a release build unless it is set already.
build_twinfs() {
    if [[ -z ${TWINFS_BIN:-} ]]; then
        say "building twinfs (cargo build --release)"
        (cd "$ROOT" && cargo build --release >&2)
        TWINFS_BIN=$ROOT/target/release/twinfs
    fi
}

# configure_pair DIR X ADDR_X Y ADDR_Y: two nodes under DIR/X and DIR/Y (vol, state,
# twinfs.toml), pinned to each other, X active and Y standby for volume "vol".
configure_pair() {
    local dir=$1 x=$2 y=$4 n o role
    local -A addr=([$2]=$3 [$4]=$5) id
    for n in "$x" "$y"; do
        mkdir -p "$dir/$n/vol" "$dir/$n/state"
        printf '[node]\nname = "%s"\nstate_dir = "%s"\n' "$n" "$dir/$n/state" > "$dir/$n/twinfs.toml"
        id[$n]=$("$TWINFS_BIN" --config "$dir/$n/twinfs.toml" init 2>/dev/null | cut -d'"' -f2)
    done
    for n in "$x" "$y"; do
        o=$x; role=standby
        [[ $n == "$x" ]] && { o=$y; role=active; }
        cat > "$dir/$n/twinfs.toml" <<TOML
[node]
name = "$n"
listen = "${addr[$n]}"
state_dir = "$dir/$n/state"
[[peer]]
name = "$o"
address = "${addr[$o]}"
node_id = "${id[$o]}"
[[volume]]
name = "vol"
path = "$dir/$n/vol"
initial_role = "$role"
TOML
    done
}

# mount_scratch IMAGE SIZE DIR: a fresh ext4 image (default mkfs.ext4) of SIZE on a
# loop device, mounted on DIR; sets LOOP.
mount_scratch() {
    truncate -s "$2" "$1"
    mkfs.ext4 -q -F "$1"
    LOOP=$(losetup -f --show "$1")
    mkdir -p "$3"
    mount -t ext4 "$LOOP" "$3"
}

# release_scratch DIR: unmounts DIR (lazily if busy) and frees LOOP; for traps.
release_scratch() {
    if mountpoint -q "$1"; then
        sleep 0.5
        umount "$1" 2>/dev/null || umount -l "$1" || true
    fi
    [[ -n ${LOOP:-} ]] && losetup -d "$LOOP" || true
}
