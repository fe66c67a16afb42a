#!/usr/bin/env bash
# Compiles the CUDA build without a GPU: nvcc 13.x from PyPI's nvidia-cuda-nvcc wheel (the -cu12
# wheels ship no nvcc) and the CUDA runtime headers into ./.venv if missing, a stub libcuda.so
# for the linker, then `cargo build --features cuda` of llamagen-encode and llamagen-train (with its example
# binaries, so linking is checked too).
#   scripts/check-cuda.sh            # CUDA_COMPUTE_CAP=80 by default (A100); 90 for H100
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
# nvcc and headers, plus the libraries candle links (cudarc's dynamic-linking): cudart, cuBLAS(Lt),
# cuRAND, NVRTC. All from PyPI; only the driver library (libcuda) is stubbed below.
# nvcc must match the toolkit headers (cudart, CCCL) exactly, so all of them are brought to the
# same (latest 13.x) release together; torch's pinned runtime is only used on the GPU.
if ! ls "$VENV"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc >/dev/null 2>&1 ||
   ! ls "$VENV"/lib/python3*/site-packages/nvidia/cu13/lib/libcurand.so.* >/dev/null 2>&1 ||
   [ "$("$PY" -m pip show nvidia-cuda-runtime 2>/dev/null | sed -n 's/^Version: \([0-9]*\.[0-9]*\).*/\1/p')" != \
     "$("$PY" -m pip show nvidia-cuda-nvcc 2>/dev/null | sed -n 's/^Version: \([0-9]*\.[0-9]*\).*/\1/p')" ]; then
  "$PY" -m pip install -q -U "nvidia-cuda-nvcc>=13,<14" "nvidia-cuda-runtime>=13,<14" \
    "nvidia-cuda-cccl>=13,<14" "nvidia-cuda-nvrtc>=13,<14" "nvidia-cublas>=13,<14" "nvidia-curand>=10.4"
fi
CUDA_ROOT=$(cd "$(dirname "$(ls "$VENV"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc | head -n1)")/.." && pwd)
export CUDA_ROOT CUDA_PATH="$CUDA_ROOT" CUDA_HOME="$CUDA_ROOT"
export PATH="$CUDA_ROOT/bin:$PATH"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
# cudarc 0.19.10 knows toolkits up to 13.4 and refuses newer nvcc versions (PyPI serves 13.5):
# bind the 13.4 API, which the 13.5 toolkit and drivers provide.
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13040}
# Link-time libraries in one directory: unversioned names for the wheels' libraries, and a stub
# libcuda.so exporting every driver API symbol that cuda.h declares (the real one comes with the
# NVIDIA driver at run time).
STUB="$CUDA_ROOT/lib/stubs"
mkdir -p "$STUB"
for lib in cudart cublas cublasLt curand nvrtc; do
  real=$(ls "$CUDA_ROOT"/lib/lib$lib.so.* 2>/dev/null | grep -v builtins | head -n1 || true)
  [ -n "$real" ] && ln -sf "$real" "$STUB/lib$lib.so"
done
if [ ! -e "$STUB/libcuda.so" ]; then
  printf '#include <cuda.h>\n' | cc -E -P -I"$CUDA_ROOT/include" -x c - |
    grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( \t' | sort -u |
    awk '{print "void " $1 "(void) {}"}' > "$STUB/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB/libcuda.so" "$STUB/cuda_stub.c"
fi
# The linker (cc) searches LIBRARY_PATH; RUSTFLAGS stay untouched so the CPU build's artefacts
# in the same target directory remain valid.
export LIBRARY_PATH="$STUB:$CUDA_ROOT/lib:${LIBRARY_PATH:-}"
nvcc --version | tail -n 2
start=$(date +%s)
# Libraries, plus train's examples so that a CUDA binary is linked too. (The llamagen binary is
# not rebuilt here: a CUDA llamagen in target/debug would replace the CPU one the tests run.)
cargo build -p llamagen-encode --features cuda
cargo build -p llamagen-train --features cuda --examples
echo "cuda build finished in $(( $(date +%s) - start )) s"
