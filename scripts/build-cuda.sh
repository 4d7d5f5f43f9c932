#!/usr/bin/env bash
# Build promptgate with `--features cuda` on a machine with no CUDA toolkit
# and no GPU, from NVIDIA's CUDA 13.0 wheels on PyPI, for running on another
# machine that has the GPU, an NVIDIA driver of R580 or later (CUDA 13) and
# cuBLAS 13.
#
# Usage: scripts/build-cuda.sh [ARCH]
#   ARCH: one CUDA architecture in CMake's form, default 90 (H100/H200);
#   89 for Ada, 80 for A100, ... Each ARCH builds in its own target
#   directory, target-cuda/smARCH, because llama-cpp-sys-2 does not rebuild
#   llama.cpp when only CMAKE_CUDA_ARCHITECTURES changes.
#
# Needs: cargo, gcc/g++, cmake (scripts/setup-debian.sh), python3 with pip.
#
# What it does:
#   1. `pip download`s six pinned wheels (nvidia-cuda-nvcc, -cuda-runtime,
#      -cuda-cccl, -cuda-crt, -nvvm, -cublas; 525 MB, cached in
#      .cache/cuda/wheels) and unpacks them into one toolkit tree,
#      .cache/cuda/x/nvidia/cu13 (bin/nvcc, include, lib, nvvm).
#   2. Builds with llama.cpp as shared libraries (LLAMA_BUILD_SHARED_LIBS=1):
#      a static build would need cuBLAS's static archives, which the wheels do
#      not carry. llama-cpp-sys-2 forwards CMAKE_* and GGML_* variables to
#      CMake: one CUDA architecture only, flash-attention kernels off (neither
#      the detector nor `train --method sft` uses them; llama.cpp then logs
#      "Flash Attention not supported, set to disabled") and no VMM (so
#      nothing links the driver's libcuda.so, which only the GPU machine has).
#   3. Copies the binary and the libraries it needs into
#      target-cuda/smARCH/dist/: promptgate, and in lib/ llama.cpp's shared
#      libraries (libllama, libggml, libggml-base, -cpu, -cuda),
#      libcudart.so.13 and libgomp.so.1. cuBLAS (libcublas.so.13 and
#      libcublasLt.so.13, 594 MB) is not copied: the GPU machine supplies it,
#      from a CUDA 13 toolkit or a CUDA 13 build of PyTorch (its nvidia-cublas
#      wheel).
#
# Run it there:
#   LD_LIBRARY_PATH=dist/lib:/usr/local/cuda-13.0/targets/x86_64-linux/lib \
#       dist/promptgate eval ...
# Every command then offloads all layers to the GPU (classify, eval, serve,
# bench and `train --method sft`). Without a usable GPU it logs "failed to
# initialize CUDA" and runs on the CPU.
#
# Measured on a 2-core build machine: 47 minutes (part of it sharing the
# cores with a CPU build), most of it nvcc on the 22 quantised
# matrix-multiply (mmq) kernels. The result ran `train --method sft` and
# `eval` on an H200 (driver 580): docs/detector.md, "On a GPU".
set -euo pipefail

ARCH="${1:-90}"
[[ "$ARCH" =~ ^[0-9]+[af]?$ ]] || { echo "build-cuda: ARCH must look like 90, 89 or 90a, not '$ARCH'" >&2; exit 2; }
ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache/cuda"
T="$CACHE/x/nvidia/cu13"
TARGET="target-cuda/sm$ARCH"
PYTHON="${PYTHON:-python3}"
WHEELS=(
    "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-runtime==13.0.96"
    "nvidia-cuda-cccl==13.0.85" "nvidia-cuda-crt==13.0.88"
    "nvidia-nvvm==13.0.88" "nvidia-cublas==13.0.2.14"
)
command -v gcc >/dev/null || { echo "build-cuda: gcc not found (scripts/setup-debian.sh)" >&2; exit 2; }

if [[ ! -x "$T/bin/nvcc" || ! -x "$T/nvvm/bin/cicc" || ! -e "$T/lib/libcublas.so.13" ]]; then
    mkdir -p "$CACHE/wheels"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
        --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2010_x86_64 \
        --platform manylinux_2_12_x86_64 --python-version 3.11 \
        -d "$CACHE/wheels" "${WHEELS[@]}"
    rm -rf "$CACHE/x"
    for spec in "${WHEELS[@]}"; do
        name="${spec%%==*}"; version="${spec##*==}"
        whl=("$CACHE/wheels/${name//-/_}-${version}-"*.whl)
        [[ -e "${whl[0]}" ]] || { echo "build-cuda: no wheel for $spec in $CACHE/wheels" >&2; exit 1; }
        "$PYTHON" -m zipfile -e "${whl[0]}" "$CACHE/x"
    done
    # zipfile does not keep the execute bits.
    chmod +x "$T"/bin/* "$T"/nvvm/bin/*
fi
# The unversioned names CMake's FindCUDAToolkit and the linker look for.
( cd "$T/lib"
  for l in cudart cublas cublasLt; do ln -sf "lib$l.so.13" "lib$l.so"; done )
ln -sfn lib "$T/lib64"

export PATH="$T/bin:$PATH"
export CUDAToolkit_ROOT="$T" CUDACXX="$T/bin/nvcc" CUDA_PATH="$T"
export CMAKE_CUDA_COMPILER="$T/bin/nvcc" CMAKE_CUDA_ARCHITECTURES="$ARCH"
export GGML_CUDA_FA=OFF GGML_CUDA_NO_VMM=ON
export LLAMA_BUILD_SHARED_LIBS=1
cd "$ROOT"
cargo build --release --features cuda --bin promptgate --target-dir "$TARGET"

# The newest llama-cpp-sys-2 build holds the libraries the binary was linked with.
OUT_LIB="$(ls -td "$TARGET"/release/build/llama-cpp-sys-2-*/out/lib | head -1)"
DIST="$ROOT/$TARGET/dist"
rm -rf "$DIST" && mkdir -p "$DIST/lib"
cp "$TARGET/release/promptgate" "$DIST/"
cp -P "$OUT_LIB"/lib*.so* "$DIST/lib/"
cp -L "$T/lib/libcudart.so.13" "$DIST/lib/"
cp -L "$(gcc -print-file-name=libgomp.so.1)" "$DIST/lib/"
for l in libllama.so.0 libggml.so.0 libggml-base.so.0 libggml-cpu.so.0 libggml-cuda.so.0 libgomp.so.1; do
    [[ -e "$DIST/lib/$l" ]] || { echo "build-cuda: $l missing from $DIST/lib" >&2; exit 1; }
done
echo "built $DIST (CUDA arch $ARCH):"
ls -la "$DIST" "$DIST/lib"
