#!/usr/bin/env bash
# Build promptgate with `--features cuda` on a machine with no CUDA toolkit
# and no GPU, from NVIDIA's CUDA 13.0 wheels on PyPI, for running on another
# machine that has the GPU (and its driver, and cuBLAS 13).
#
# Usage: scripts/build-cuda.sh [CUDA_ARCH]     (default 90: H100/H200)
#
# What it does:
#   1. `pip download`s nvidia-cuda-nvcc, -cuda-runtime, -cuda-cccl, -cuda-crt,
#      -nvvm and -cublas 13.0.* (wheels only, about 470 MB, cached in
#      .cache/cuda/wheels) and unpacks them into one toolkit tree,
#      .cache/cuda/x/nvidia/cu13 (bin/nvcc, include, lib, nvvm).
#   2. Builds with llama.cpp as shared libraries (LLAMA_BUILD_SHARED_LIBS=1):
#      a static build would need cuBLAS's static archives, which the wheels do
#      not carry. llama-cpp-sys-2 forwards CMAKE_* and GGML_* variables to
#      CMake: one CUDA architecture only, flash-attention kernels off (neither
#      the detector nor `train --method sft` uses them) and no VMM (so nothing
#      links the driver's libcuda.so, which only the GPU machine has).
#   3. Copies the binary and the libraries it needs into target-cuda/dist/:
#      promptgate, and in lib/ llama.cpp's shared libraries (libllama,
#      libggml, libggml-base, -cpu, -cuda), libcudart.so.13 and libgomp.so.1. cuBLAS (about 500 MB) is not copied: the GPU machine
#      supplies it (a CUDA 13 toolkit, or PyTorch's nvidia-cublas wheel).
#
# Run it there:
#   LD_LIBRARY_PATH=dist/lib:/path/to/cublas13/lib dist/promptgate ...
# Every command then offloads all layers to the GPU (classify, eval, serve,
# bench and `train --method sft`).
#
# Measured on a 2-core build machine: 47 minutes (part of it sharing the
# cores with a CPU build), most of it nvcc on the 22 quantised
# matrix-multiply (mmq) kernels; the toolkit download is about 470 MB. The
# result ran `train --method sft` and `eval` on an H200 (driver 580): see
# docs/detector.md, "On a GPU".
set -euo pipefail

ARCH="${1:-90}"
ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache/cuda"
T="$CACHE/x/nvidia/cu13"
PYTHON="${PYTHON:-python3}"

mkdir -p "$CACHE/wheels"
if [[ ! -x "$T/bin/nvcc" || ! -d "$T/nvvm" || ! -e "$T/lib/libcublas.so.13" ]]; then
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
        --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2010_x86_64 \
        --platform manylinux_2_12_x86_64 --python-version 3.11 \
        -d "$CACHE/wheels" \
        "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" \
        "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-crt==13.0.*" \
        "nvidia-nvvm==13.0.*" "nvidia-cublas==13.0.*"
    for w in "$CACHE"/wheels/*.whl; do
        "$PYTHON" -m zipfile -e "$w" "$CACHE/x"
    done
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
cargo build --release --features cuda --bin promptgate --target-dir target-cuda

DIST="$ROOT/target-cuda/dist"
rm -rf "$DIST" && mkdir -p "$DIST/lib"
cp target-cuda/release/promptgate "$DIST/"
find target-cuda/release/build -path '*llama-cpp-sys-2-*/out/lib*/*.so*' \
    -exec cp -P {} "$DIST/lib/" \;
cp -L "$T/lib/libcudart.so.13" "$DIST/lib/"
cp -L "$(gcc -print-file-name=libgomp.so.1)" "$DIST/lib/"
echo "built $DIST (CUDA arch $ARCH):"
ls -la "$DIST" "$DIST/lib"
