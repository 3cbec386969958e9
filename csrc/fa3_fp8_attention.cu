// A C entry point to one FlashAttention-3 forward kernel: FP8 E4M3 Q, K and V, head width 128, no mask, BF16
// output, per-tensor descales read from the device (so CUDA graphs can capture the call). V goes in rows and the
// kernel transposes it in shared memory (FlashAttention-3's maintained FP8 path; its column-major-V path does not
// compile at the pinned commit). Loaded with ctypes, so no PyTorch headers or ABI are involved.
#include <cstring>
#include <stdexcept>

#include "cuda_check.h"
// FlashAttention-3 exits the process on a CUDA or CUTLASS error; inside ComfyUI that must be an error message.
#undef CHECK_CUDA
#undef CHECK_CUTLASS
#define CHECK_CUDA(call)                                                                    \
    do {                                                                                    \
        cudaError_t status_ = (call);                                                       \
        if (status_ != cudaSuccess) { throw std::runtime_error(cudaGetErrorString(status_)); } \
    } while (0)
#define CHECK_CUTLASS(call)                                                                 \
    do {                                                                                    \
        cutlass::Status status_ = (call);                                                   \
        if (status_ != cutlass::Status::kSuccess) {                                         \
            throw std::runtime_error(cutlass::cutlassGetStatusString(status_));             \
        }                                                                                   \
    } while (0)

#include "flash_fwd_launch_template.h"

namespace {

void copy_message(char *out, int out_len, const char *message) {
    if (out == nullptr || out_len <= 0) { return; }
    std::strncpy(out, message, out_len - 1);
    out[out_len - 1] = '\0';
}

}  // namespace

extern "C" {

// q, k, v: [B, H, L, 128] with the given strides (elements), last dimension contiguous; o: [B, L, H, 128] bfloat16
// (any strides, last dimension contiguous); lse: float32 [B, H, L] scratch; scales: float32 [3] on the device (Q, K,
// V scales). Returns 0, or -1 with a message in `error`.
int kontext_fa3_fp8_attention(const void *q, const void *k, const void *v, void *o, float *lse, const float *scales,
                              int batch, int heads, int seq_len,
                              long long q_batch_stride, long long q_head_stride, long long q_row_stride,
                              long long k_batch_stride, long long k_head_stride, long long k_row_stride,
                              long long v_batch_stride, long long v_head_stride, long long v_row_stride,
                              long long o_batch_stride, long long o_head_stride, long long o_row_stride,
                              int num_sm, void *stream, char *error, int error_len) {
    try {
        Flash_fwd_params params = {};
        params.is_e4m3 = true;
        params.q_ptr = const_cast<void *>(q);
        params.k_ptr = const_cast<void *>(k);
        params.v_ptr = const_cast<void *>(v);
        params.o_ptr = o;
        params.q_batch_stride = q_batch_stride;
        params.q_head_stride = q_head_stride;
        params.q_row_stride = q_row_stride;
        params.k_batch_stride = k_batch_stride;
        params.k_head_stride = k_head_stride;
        params.k_row_stride = k_row_stride;
        params.v_batch_stride = v_batch_stride;
        params.v_head_stride = v_head_stride;
        params.v_row_stride = v_row_stride;
        params.v_dim_stride = 1;
        params.o_batch_stride = o_batch_stride;
        params.o_head_stride = o_head_stride;
        params.o_row_stride = o_row_stride;
        params.softmax_lse_ptr = lse;
        // One [3] tensor broadcast to every batch and head (strides 0): the pack's scales are per tensor.
        params.q_descale_ptr = const_cast<float *>(scales);
        params.k_descale_ptr = const_cast<float *>(scales) + 1;
        params.v_descale_ptr = const_cast<float *>(scales) + 2;
        params.b = params.b_k = batch;
        params.h = params.h_k = heads;
        params.seqlen_q = params.seqlen_k = params.total_q = params.total_k = seq_len;
        params.seqlen_q_rounded = params.seqlen_k_rounded = (seq_len + 127) / 128 * 128;
        params.d = params.d_rounded = params.dv = params.dv_rounded = 128;
        params.scale_softmax = 1.0f / sqrtf(128.0f);
        params.softcap = 0.f;
        params.p_dropout = 1.f;
        params.rp_dropout = 1.f;
        params.window_size_left = seq_len - 1;
        params.window_size_right = seq_len - 1;
        params.num_splits = 1;
        params.arch = 90;
        params.num_sm = num_sm;
        run_flash_fwd<90, 128, 128, 1, cutlass::float_e4m3_t, cutlass::bfloat16_t,
                      /*Is_causal=*/false, /*Is_local=*/false, /*Has_softcap=*/false, /*Varlen=*/false,
                      /*PagedKVNonTMA=*/false, /*AppendKV=*/false, /*HasQv=*/false, /*PackGQA=*/false,
                      /*Split=*/false, /*V_colmajor=*/false>(params, static_cast<cudaStream_t>(stream));
        CHECK_CUDA(cudaGetLastError());
        return 0;
    } catch (const std::exception &e) {
        copy_message(error, error_len, e.what());
        return -1;
    }
}

}  // extern "C"
