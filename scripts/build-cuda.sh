#!/usr/bin/env bash
# Build `cascade` with the `cuda` feature on a machine with no GPU and no CUDA
# toolkit, and pack a self-describing bundle for a GPU host:
#   dist/cascade-cuda-<commit>.tar.zst  =  bin/cascade (CUDA build)
#                                         + artifact/ (a trained MovieLens-100K artifact)
#                                         + run-gpu-checks.sh + BUNDLE.txt
# The toolkit comes from pinned CUDA 13.0 wheels on PyPI (the GPU hosts run
# driver 580 = CUDA 13.0; a newer nvcc would emit PTX that driver rejects).
# Everything lands under .cuda-build/ (git-ignored); the CPU build and its
# target/ directory are not touched.
#   scripts/build-cuda.sh            # toolkit + build + bundle
#   scripts/build-cuda.sh --check    # toolkit + `cargo check --features cuda` only
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
W=$ROOT/.cuda-build
mkdir -p "$W"

# 1. Toolkit from wheels, pinned by version and sha256 (scripts/cuda-wheels.txt).
if [ ! -x "$W/site/nvidia/cu13/bin/nvcc" ]; then
  python3 -m pip download -q --no-deps --require-hashes -r scripts/cuda-wheels.txt -d "$W/wheels"
  python3 -m pip install -q --no-deps --no-index --target "$W/site" "$W"/wheels/*.whl
fi
C=$W/site/nvidia/cu13
(cd "$C/lib" && for l in cudart cublas cublasLt nvrtc; do ln -sf "lib$l.so.13" "lib$l.so"; done \
  && ln -sf libcurand.so.10 libcurand.so)

# 2. libcuda only exists with a driver. Link against a stub whose every cu*
#    entry point returns CUDA_ERROR_STUB_LIBRARY (34); the real driver's
#    libcuda.so.1 is found at run time. The stub never leaves this directory.
if [ ! -f "$C/lib/stubs/libcuda.so" ]; then
  src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | head -1 || true)
  if [ -z "$src" ]; then
    cargo fetch -q
    src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | head -1)
  fi
  grep -ohE '^pub unsafe fn cu[A-Za-z0-9_]+' "$src/src/driver/sys/mod.rs" \
    | awk '{print "int "$4"(void){return 34;}"}' | sort -u > "$W/cuda_stub.c"
  mkdir -p "$C/lib/stubs"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$C/lib/stubs/libcuda.so" "$W/cuda_stub.c"
fi

export PATH=$C/bin:$PATH CUDA_ROOT=$C CUDA_HOME=$C CUDA_PATH=$C
# sm_90a: H100/H200. Without it the kernel build would call nvidia-smi.
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2}
export CUDARC_CUDA_VERSION=13000 CARGO_TARGET_DIR=$W/target

if [ "${1:-}" = "--check" ]; then
  cargo check -q -p cascade --features cuda
  echo "cuda feature compiles (cargo check)"
  exit 0
fi

cargo build --release -p cascade --features cuda
BIN=$W/target/release/cascade

# 3. A small trained artifact: the newest under artifacts/, else train one.
art=$(ls -d artifacts/*/ 2>/dev/null | sort | tail -1 || true)
if [ -z "$art" ]; then
  cargo build --release -q -p cascade
  target/release/cascade fetch movielens-100k
  target/release/cascade fetch minilm
  target/release/cascade train --quiet
  art=$(ls -d artifacts/*/ | sort | tail -1)
fi

commit=$(git describe --always --dirty)
stage=$W/bundle/cascade-cuda-$commit
rm -rf "$stage" && mkdir -p "$stage/bin" "$stage/artifact"
cp "$BIN" "$stage/bin/cascade"
cp -r "$art"/. "$stage/artifact/"
cp scripts/run-gpu-checks.sh "$stage/"
cat > "$stage/BUNDLE.txt" <<EOF
cascade CUDA bundle
commit:          $commit
built:           $(date -u +%Y-%m-%dT%H:%M:%SZ) on a CPU-only machine (no GPU, no driver)
toolkit:         CUDA 13.0 wheels (nvcc 13.0.88, cublas 13.0.2.14, curand 10.4.0.35)
compute cap:     sm_${CUDA_COMPUTE_CAP}a
needs at run:    driver >= 580 (libcuda.so.1), libcublas.so.13, libcublasLt.so.13,
                 libcurand.so.10, libcudart.so.13 (the host's nvidia wheels; run-gpu-checks.sh finds them)
artifact:        $(basename "$art") (MovieLens-100K)
run:             ./run-gpu-checks.sh   (writes results/ next to it)
EOF
mkdir -p dist
out=dist/cascade-cuda-$commit.tar.zst
tar -C "$W/bundle" -cf - "cascade-cuda-$commit" | zstd -q -19 -T2 -f -o "$out"
size=$(stat -c %s "$out")
echo "bundle: $out ($((size / 1048576)) MiB; limit 60 MiB)"
[ "$size" -le $((60 * 1048576)) ] || { echo "bundle over 60 MiB" >&2; exit 1; }
