# Shared by scripts/demo and scripts/test: install what a fresh Debian 12 machine lacks.
# shellcheck shell=bash

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "twinfs: this needs root (it mounts FUSE filesystems in place); run it with sudo" >&2
        exit 1
    fi
}

# apt packages the build, the daemon and the tests use.
install_packages() {
    local missing=()
    command -v fusermount3 >/dev/null 2>&1 || missing+=(fuse3)
    command -v setfattr >/dev/null 2>&1 || missing+=(attr)
    command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
    command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
    command -v ip >/dev/null 2>&1 || missing+=(iproute2)
    # Further needs of the caller, as COMMAND:PACKAGE.
    local need
    for need in "$@"; do
        command -v "${need%%:*}" >/dev/null 2>&1 || missing+=("${need#*:}")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "== installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    [ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
    if [ ! -e /dev/fuse ]; then
        echo "twinfs: /dev/fuse is missing and the fuse module cannot be loaded" >&2
        exit 1
    fi
}

# A Rust toolchain new enough for fuser 0.18 (Rust 1.85+).
ensure_rust() {
    if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "== installing the Rust toolchain with rustup"
        command -v curl >/dev/null 2>&1 || apt-get install -y -qq curl ca-certificates >/dev/null
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if command -v rustup >/dev/null 2>&1; then
        rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
    fi
}
