// Experiment (benchmarks/gemm_epilogue_cutlass_experiment.py): CUTLASS 3 FP8 GEMMs for Hopper with the Kontext
// step's elementwise work fused into their epilogues (CUTLASS's own fusion operations, no custom visitor):
//   bias:     D(bf16) = s_a s_b acc + bias
//   gelu_fp8: D(fp8)  = sat(GELU_tanh(s_a s_b acc + bias) * d_scale)            (the MLP's first GEMM and its GELU)
//   residual: D(bf16) = alpha[col] acc + bias[col] + C, alpha = gate s_a s_b, bias = gate * bias   (gated residual)
// A [M, K] row-major FP8, B = W [N, K] row-major FP8 (a column-major K x N operand), D [M, N] in rows. The mainloop
// is CUTLASS's FP8 one with its FP32 promotion (as cuBLAS without fast accumulation, which the pack uses).
// Built with the CUTLASS of scripts/build_fa3_fp8.sh (7127592), one tile config per library, e.g.
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr --expt-extended-lambda -DCUTLASS_ENABLE_GDC_FOR_SM90 -DNDEBUG \
//     -DTILE_M=128 -DTILE_N=128 -DTILE_K=128 -DCLUSTER_M=1 -DCLUSTER_N=2 -DPINGPONG=0 \
//     -gencode arch=compute_90a,code=sm_90a -I$CUTLASS/include -I$CUTLASS/tools/util/include \
//     -Xcompiler -fPIC -shared -cudart static -o c128x128_1x2.so gemm_epilogue_cutlass_experiment.cu
#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

#ifndef TILE_M
#define TILE_M 128
#define TILE_N 128
#define TILE_K 128
#define CLUSTER_M 1
#define CLUSTER_N 2
#define PINGPONG 0
#endif

using TileShape = Shape<Int<TILE_M>, Int<TILE_N>, Int<TILE_K>>;
using ClusterShape = Shape<Int<CLUSTER_M>, Int<CLUSTER_N>, _1>;
#if PINGPONG
using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecialized;
#else
using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
#endif

using E4M3 = cutlass::float_e4m3_t;
using BF16 = cutlass::bfloat16_t;
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::ColumnMajor;
using LayoutD = cutlass::layout::RowMajor;

template <class ElementC, class ElementD, class Fusion>
struct Fp8Gemm {
    static constexpr int AlignC = 128 / cutlass::sizeof_bits<std::conditional_t<std::is_void_v<ElementC>, ElementD, ElementC>>::value;
    using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
        cutlass::epilogue::collective::EpilogueTileAuto, float, float,
        ElementC, LayoutD, AlignC, ElementD, LayoutD, 128 / cutlass::sizeof_bits<ElementD>::value,
        EpilogueSchedule, Fusion>::CollectiveOp;
    using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, E4M3, LayoutA, 16, E4M3, LayoutB, 16, float,
        TileShape, ClusterShape,
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
        KernelSchedule>::CollectiveOp;
    using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue>;
    using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
    using StrideA = typename Gemm::GemmKernel::StrideA;
    using StrideB = typename Gemm::GemmKernel::StrideB;
    using StrideC = typename Gemm::GemmKernel::StrideC;
    using StrideD = typename Gemm::GemmKernel::StrideD;

    template <class SetFusion>
    static int run(int m, int n, int k, const void* a, long lda, const void* b, long ldb, const void* c, long ldc,
                   void* d, long ldd, void* workspace, size_t workspace_bytes, cudaStream_t stream, SetFusion set) {
        StrideA sa = cutlass::make_cute_packed_stride(StrideA{}, make_shape(m, k, 1));
        StrideB sb = cutlass::make_cute_packed_stride(StrideB{}, make_shape(n, k, 1));
        StrideC sc = cutlass::make_cute_packed_stride(StrideC{}, make_shape(m, n, 1));
        StrideD sd = cutlass::make_cute_packed_stride(StrideD{}, make_shape(m, n, 1));
        get<0>(sa) = lda;
        get<0>(sb) = ldb;
        get<0>(sc) = ldc;
        get<0>(sd) = ldd;
        typename Gemm::Arguments args{
            cutlass::gemm::GemmUniversalMode::kGemm, {m, n, k, 1},
            {static_cast<const E4M3*>(a), sa, static_cast<const E4M3*>(b), sb},
            {{}, static_cast<const std::conditional_t<std::is_void_v<ElementC>, ElementD, ElementC>*>(c), sc,
             static_cast<ElementD*>(d), sd}};
        set(args.epilogue.thread);
        Gemm gemm;
        if (Gemm::get_workspace_size(args) > workspace_bytes) return 1;
        if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 2;
        if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return 3;
        if (gemm.run(stream) != cutlass::Status::kSuccess) return 4;
        return cudaGetLastError() == cudaSuccess ? 0 : 5;
    }
};

using BiasFusion = cutlass::epilogue::fusion::ScaledLinCombPerColBiasEltAct<
    cutlass::epilogue::thread::Identity, BF16, float, BF16, BF16, float>;
using GeluFusion = cutlass::epilogue::fusion::ScaledLinCombPerColBiasEltAct<
    cutlass::epilogue::thread::GELU_taylor, E4M3, float, BF16, E4M3, float>;
using ResidualFusion = cutlass::epilogue::fusion::PerColResAddPerColBiasEltAct<
    cutlass::epilogue::thread::Identity, BF16, float, float, BF16, float>;

using BiasGemm = Fp8Gemm<void, BF16, BiasFusion>;
using GeluGemm = Fp8Gemm<void, E4M3, GeluFusion>;
using ResidualGemm = Fp8Gemm<BF16, BF16, ResidualFusion>;

extern "C" {

int kontext_fp8_gemm_bias(int m, int n, int k, const void* a, long lda, const void* b, long ldb, const void* bias,
                          const float* scale_a, const float* scale_b, void* d, long ldd, void* ws, size_t ws_bytes,
                          cudaStream_t stream) {
    return BiasGemm::run(m, n, k, a, lda, b, ldb, nullptr, ldd, d, ldd, ws, ws_bytes, stream, [&](auto& f) {
        f.scale_a_ptr = scale_a;
        f.scale_b_ptr = scale_b;
        f.bias_ptr = static_cast<const BF16*>(bias);
        f.beta = 0.f;
    });
}

int kontext_fp8_gemm_gelu_fp8(int m, int n, int k, const void* a, long lda, const void* b, long ldb, const void* bias,
                              const float* scale_a, const float* scale_b, const float* d_scale, void* d, long ldd,
                              void* ws, size_t ws_bytes, cudaStream_t stream) {
    return GeluGemm::run(m, n, k, a, lda, b, ldb, nullptr, ldd, d, ldd, ws, ws_bytes, stream, [&](auto& f) {
        f.scale_a_ptr = scale_a;
        f.scale_b_ptr = scale_b;
        f.scale_d_ptr = d_scale;
        f.bias_ptr = static_cast<const BF16*>(bias);
        f.beta = 0.f;
    });
}

int kontext_fp8_gemm_residual(int m, int n, int k, const void* a, long lda, const void* b, long ldb,
                              const float* alpha, const float* bias, const void* c, long ldc, void* d, long ldd,
                              void* ws, size_t ws_bytes, cudaStream_t stream) {
    return ResidualGemm::run(m, n, k, a, lda, b, ldb, c, ldc, d, ldd, ws, ws_bytes, stream, [&](auto& f) {
        f.alpha_ptr = alpha;
        f.bias_ptr = bias;
        f.beta = 1.f;
        f.dBeta = {_0{}, false, 0};
    });
}

}
