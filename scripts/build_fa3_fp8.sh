#!/usr/bin/env bash
# Builds FlashAttention-3's FP8 attention forward for Hopper (sm_90a: H100, H200, GH200) with the pack's patch
# (csrc/fa3_kontext.patch: P x V promoted to FP32 per block of keys, P on the recipe's 1/448 grid) as one shared
# library the pack loads with ctypes (engines/fp8_attention_fa3.py). Optional: without it the pack's Triton
# kernel attends. Needs nvcc (CUDA 12.3 or newer; built and checked here with 13.0) and ~4 GB of memory;
# takes ~2 minutes on 2 cores. Only the one kernel the pack calls is compiled (FP8 E4M3, head width 128, no mask).
#
#   scripts/build_fa3_fp8.sh [--flash-attention DIR] [--cutlass DIR] [--out FILE]
#
# DIR: checkouts of Dao-AILab/flash-attention and NVIDIA/cutlass at the commits below (without them, both are
# cloned into a temporary directory: needs network). FILE: default build/fa3_fp8_attention_sm90.so in the pack,
# where the loader looks (or set KONTEXT_TRT_FA3_LIBRARY to FILE). Written atomically.
set -euo pipefail

FLASH_ATTENTION_COMMIT=0251105a2fb19d2957484b7f023cd8c115286ced  # 2026-08-15
CUTLASS_COMMIT=7127592069c2fe01b041e174ba4345ef9b279671          # flash-attention's csrc/cutlass at that commit
# Keys per block of P x V: each block's sum is promoted to FP32, so its accumulator is live beside the running
# output; 128 keeps the consumer warpgroups within their registers (192: 280 bytes of spills, slower on an H100).
BLOCK_N=128

PACK="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FA_DIR="" CUTLASS_DIR="" OUT="$PACK/build/fa3_fp8_attention_sm90.so"
while [ $# -gt 0 ]; do
    case "$1" in
        --flash-attention) FA_DIR="$2"; shift 2 ;;
        --cutlass) CUTLASS_DIR="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "build_fa3_fp8.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

NVCC="${NVCC:-$(command -v nvcc || true)}"
[ -n "$NVCC" ] || { echo "build_fa3_fp8.sh: nvcc not found (install the CUDA toolkit, or set NVCC)" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

checkout() {  # checkout NAME URL COMMIT -> prints the directory
    git clone --quiet --filter=blob:none --no-checkout "$2" "$WORK/$1" >&2
    git -C "$WORK/$1" checkout --quiet "$3" >&2
    echo "$WORK/$1"
}
check_commit() {  # a given checkout at another commit may not take the patch or may compile differently
    if git -C "$1" rev-parse HEAD >/dev/null 2>&1; then
        local head; head="$(git -C "$1" rev-parse HEAD)"
        [ "$head" = "$2" ] || echo "build_fa3_fp8.sh: warning: $1 is at $head, the pack was checked with $2" >&2
    fi
}
if [ -z "$FA_DIR" ]; then
    FA_DIR="$(checkout flash-attention https://github.com/Dao-AILab/flash-attention.git "$FLASH_ATTENTION_COMMIT")"
else
    check_commit "$FA_DIR" "$FLASH_ATTENTION_COMMIT"
fi
if [ -z "$CUTLASS_DIR" ]; then
    CUTLASS_DIR="$(checkout cutlass https://github.com/NVIDIA/cutlass.git "$CUTLASS_COMMIT")"
else
    check_commit "$CUTLASS_DIR" "$CUTLASS_COMMIT"
fi
[ -f "$FA_DIR/hopper/mainloop_fwd_sm90_tma_gmma_ws.hpp" ] || {
    echo "build_fa3_fp8.sh: --flash-attention $FA_DIR has no hopper/ sources (FlashAttention-3)" >&2; exit 1; }
[ -f "$CUTLASS_DIR/include/cute/tensor.hpp" ] || {
    echo "build_fa3_fp8.sh: --cutlass $CUTLASS_DIR has no include/cute/tensor.hpp" >&2; exit 1; }

# Patched in a copy: the given checkout is left as it was.
mkdir -p "$WORK/src"
cp -r "$FA_DIR/hopper" "$WORK/src/hopper"
patch --quiet -p1 -d "$WORK/src" < "$PACK/csrc/fa3_kontext.patch"

mkdir -p "$(dirname "$OUT")"
TMP_OUT="$(dirname "$OUT")/.$(basename "$OUT").$$.tmp"
# FlashAttention-3's own flags (hopper/setup.py) for this one kernel; -cudart static so the library needs only
# the driver, whatever CUDA runtime PyTorch brings.
"$NVCC" -O3 -std=c++17 --use_fast_math --expt-relaxed-constexpr --expt-extended-lambda \
    -DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED -DCUTLASS_ENABLE_GDC_FOR_SM90 -DCUTLASS_DEBUG_TRACE_LEVEL=0 -DNDEBUG \
    -DFLASHATTENTION_DISABLE_BACKWARD \
    -DKONTEXT_PROMOTE_PV -DKONTEXT_P_SCALE_448 -DKONTEXT_FP8_BLOCK_N="$BLOCK_N" \
    -gencode arch=compute_90a,code=sm_90a --resource-usage \
    -I"$WORK/src/hopper" -I"$CUTLASS_DIR/include" \
    -Xcompiler -fPIC -shared -cudart static \
    -o "$TMP_OUT" "$PACK/csrc/fa3_fp8_attention.cu" || { rm -f "$TMP_OUT"; exit 1; }
mv -f "$TMP_OUT" "$OUT"
echo "built $OUT"
