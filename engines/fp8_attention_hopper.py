"""FP8 attention for Hopper (sm_90) in Gluon: the recipe of `fp8_attention_triton.py`, scheduled by hand.

Why a second kernel: Triton runs the tensor cores, the exponentials (special-function units) and the FP32
work of the online softmax one after another; on an H100 at 8704 tokens those three take about the same
time each, so the Triton kernel sits near their sum (1.24 ms a call, ~750 TFLOP/s). FlashAttention-3
overlaps them; its FP8 path is a CUDA build ComfyUI installs lack, and it (like cuDNN's FP8 attention)
sums P x V in the tensor cores' reduced-precision FP8 accumulator across all keys, which costs this
model 0.007 of output cosine (see README). Gluon (Triton's lower-level language, shipped with Triton)
exposes what the overlap needs: asynchronous warpgroup MMAs, TMA, mbarriers and warp specialization.

The schedule, per CTA of BLOCK_M = 128 queries of one head:
  - a producer warp streams K and V^T tiles through a STAGES-deep shared-memory ring (TMA, mbarriers);
  - two consumer warpgroups own 64 query rows each. Each iteration issues S_j = Q K_j^T and
    PV = P_{j-1} V_{j-1} (into a fresh FP32 accumulator: the promotion that keeps the sum over all keys
    out of the FP8 accumulator) as asynchronous MMAs, then computes the softmax of S_j while PV runs,
    then adds PV to the running output;
  - with PINGPONG the two warpgroups take turns issuing their MMAs (an mbarrier pair), so one's softmax
    runs while the other's MMAs do, as FlashAttention-3 does with named barriers.

Same inputs, scales and output as fp8_attention_triton.fp8_attention (Q, K [B, H, L, D] contiguous; V^T
[B, H, D, L] with 16-byte aligned rows; O [B, L, H, D]), the same FP8 rounding of P (amax 1, scale
1/448) and the same FP32 softmax. Imported only on CUDA with Gluon (Triton >= 3.5).
"""

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.core import _aggregate as aggregate

LOG2E = 1.4426950408889634
LOG2_FP8_MAX = gl.constexpr(8.807354922057604)  # log2(448): P on the FP8 grid with amax 1 is stored as 448 P
QUERY_ROWS = 128  # per CTA: two consumer warpgroups x 64 rows (a warpgroup MMA is 64 rows tall)
BLOCK_M = gl.constexpr(QUERY_ROWS)


@aggregate
class _Tiles:
    """The kernel's compile-time shape, in one value: Triton 3.6 turns constexpr arguments of warp-specialized
    partitions into run-time integers, but keeps an aggregate's constexpr fields."""
    BLOCK_N: gl.constexpr
    HEAD_DIM: gl.constexpr
    STAGES: gl.constexpr
    PINGPONG: gl.constexpr
    KEYS_PERMUTED: gl.constexpr
    DIAG: gl.constexpr

    @gluon.constexpr_function
    def __init__(self, BLOCK_N, HEAD_DIM, STAGES, PINGPONG, KEYS_PERMUTED, DIAG):
        self.BLOCK_N = gl.constexpr(BLOCK_N)
        self.HEAD_DIM = gl.constexpr(HEAD_DIM)
        self.STAGES = gl.constexpr(STAGES)
        self.PINGPONG = gl.constexpr(PINGPONG)
        self.KEYS_PERMUTED = gl.constexpr(KEYS_PERMUTED)
        self.DIAG = gl.constexpr(DIAG)


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
              q_row, kv_row, v_row, num_blocks, tiles):
    BLOCK_N: gl.constexpr = tiles.BLOCK_N
    STAGES: gl.constexpr = tiles.STAGES
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
    for j in range(num_blocks):
        stage = j % STAGES
        phase = (j // STAGES) & 1
        # A fresh mbarrier counts as having completed the phase before phase 0: the first pass does not wait.
        mbarrier.wait(k_empty.index(stage), phase ^ 1)
        mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row + j * BLOCK_N, 0], k_ready.index(stage), k_smem.index(stage))
        mbarrier.wait(v_empty.index(stage), phase ^ 1)
        mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [v_row, j * BLOCK_N], v_ready.index(stage), v_smem.index(stage))


@gluon.jit
def _softmax_block(s, m_i, l_i, qk_scale, start_n, seq_len, MASKED: gl.constexpr, BLOCK_N: gl.constexpr,
                   s_layout: gl.constexpr, DIAG: gl.constexpr = 0):
    """Online softmax of one block of scores: returns 448 P (FP32, exponent-shifted so that amax 1 of P
    lands on 448), the new row max (log2 domain, scaled) and sum, and the factor for the older output."""
    if MASKED:
        offs_n = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(gl.expand_dims(offs_n < seq_len, 0), s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    if DIAG == 1:  # timing diagnosis only: no exponentials (wrong numbers)
        p = s * qk_scale - gl.expand_dims(m_new - LOG2_FP8_MAX, 1)
    else:
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new - LOG2_FP8_MAX, 1))
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, l_i, alpha


@gluon.jit
def _p_operand(p, p_layout: gl.constexpr, KEYS_PERMUTED: gl.constexpr):
    """448 P (FP32, score layout) -> FP8 in the register layout of the P x V MMA's A operand.

    In the score (accumulator) layout a thread holds columns 8i + 2q + {0, 1} of its rows (q = lane % 4);
    the A operand wants 32kk + 16h + 4q + {0..3}. With KEYS_PERMUTED the keys of V^T come permuted within
    each 32 (see key_order) so that the thread's own registers already are its A operand, in the same
    order: no shuffles; otherwise the layouts are converted (shuffles and byte permutes)."""
    p8 = p.to(gl.float8e4nv)
    if KEYS_PERMUTED:
        rows: gl.constexpr = p8.shape[0]
        cols: gl.constexpr = p8.shape[1]
        x = p8.reshape([rows, cols // 32, 2, 2, 4, 2])  # column = 32 kk + 16 h + 8 g + 2 q + e
        x = x.permute((0, 1, 2, 4, 3, 5)).reshape([rows, cols])  # -> 32 kk + 16 h + 4 q + 2 g + e
        return gl.convert_layout(x, p_layout, assert_trivial=True)
    return gl.convert_layout(p8, p_layout)


@gluon.jit
def _take_turn(turn, WG: gl.constexpr, count, PINGPONG: gl.constexpr):
    if PINGPONG:  # turn `count` of warpgroup WG waits for the other's turn count - 1 (WG 0) or count (WG 1)
        mbarrier.wait(turn.index(WG), (count + 1 - WG) & 1)


@gluon.jit
def _end_turn(turn, WG: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG), count=1)


@gluon.jit
def _attend_step(j, O, P, m_i, l_i, alpha_prev, q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn,
                 qk_scale, seq_len, WG: gl.constexpr, MASKED: gl.constexpr, BLOCK_N: gl.constexpr,
                 HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr, KEYS_PERMUTED: gl.constexpr,
                 DIAG: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr):
    """S_j = Q K_j^T and PV_{j-1} = P_{j-1} V_{j-1} issued together; the softmax of S_j runs under PV."""
    HALF: gl.constexpr = 64
    stage = j % STAGES
    prev = (j - 1) % STAGES
    mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
    mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
    _take_turn(turn, WG, j, PINGPONG)
    s = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), gl.zeros([HALF, BLOCK_N], gl.float32, s_layout),
                      use_acc=False, is_async=True)
    if DIAG == 2:  # timing diagnosis only: no P x V MMA in the loop (wrong numbers)
        pv = gl.zeros([HALF, HEAD_DIM], gl.float32, o_layout)
    else:
        pv = warpgroup_mma(P, v_smem.index(prev).permute((1, 0)),
                           gl.zeros([HALF, HEAD_DIM], gl.float32, o_layout), use_acc=False, is_async=True)
    _end_turn(turn, WG, PINGPONG)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
    mbarrier.arrive(k_empty.index(stage), count=1)
    # V_{j-2}'s tile is released here, one iteration late: released right after PV's wait, ptxas hoists the
    # wait and the arrive (which nothing in the softmax depends on) above the softmax, serializing PV with it.
    mbarrier.arrive(v_empty.index((j - 2 + STAGES) % STAGES), count=1, pred=j >= 2)
    p, m_i, l_i, alpha = _softmax_block(s, m_i, l_i, qk_scale, j * BLOCK_N, seq_len, MASKED, BLOCK_N, s_layout,
                                        DIAG)
    pv = warpgroup_mma_wait(num_outstanding=0, deps=(pv, ))
    # The rescale depends on PV and alpha_prev only, so ptxas would schedule it, and the wait for PV with
    # it, ahead of the exponentials, and PV would no longer run under the softmax. Adding l_i * 0 (not
    # folded: l_i could be NaN for all IEEE knows) ties it to the end of the softmax.
    alpha_prev = alpha_prev + l_i * 0.0
    O = O * gl.expand_dims(gl.convert_layout(alpha_prev, gl.SliceLayout(1, o_layout)), 1) + pv
    P = _p_operand(p, p_layout, KEYS_PERMUTED)
    return O, P, m_i, l_i, alpha


@gluon.jit
def _consumer(WG: gl.constexpr, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn,
              O_ptr, Scales, sm_scale_log2, seq_len, row0, stride_ol, num_blocks, tiles):
    BLOCK_N: gl.constexpr = tiles.BLOCK_N
    HEAD_DIM: gl.constexpr = tiles.HEAD_DIM
    STAGES: gl.constexpr = tiles.STAGES
    PINGPONG: gl.constexpr = tiles.PINGPONG
    HALF: gl.constexpr = 64
    # One warpgroup: 4 warps along M, 16 rows each; k = 32 for 8-bit operands.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 32])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    qk_scale = gl.load(Scales) * gl.load(Scales + 1) * sm_scale_log2
    v_scale = gl.load(Scales + 2)

    mbarrier.wait(q_bar, 0)
    q = q_smem.slice(WG * HALF, HALF)
    m_i = gl.full([HALF], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([HALF], gl.float32, gl.SliceLayout(1, s_layout))

    # Block 0: scores only (masked, in case it is the ragged last block too).
    mbarrier.wait(k_ready.index(0), 0)
    _take_turn(turn, WG, 0, PINGPONG)
    s = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), gl.zeros([HALF, BLOCK_N], gl.float32, s_layout),
                      use_acc=False, is_async=True)
    _end_turn(turn, WG, PINGPONG)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    mbarrier.arrive(k_empty.index(0), count=1)
    p, m_i, l_i, alpha = _softmax_block(s, m_i, l_i, qk_scale, 0, seq_len, True, BLOCK_N, s_layout)
    P = _p_operand(p, p_layout, tiles.KEYS_PERMUTED)
    O = gl.zeros([HALF, HEAD_DIM], gl.float32, o_layout)

    ragged = (seq_len % BLOCK_N) != 0
    unmasked_end = num_blocks - ragged.to(gl.int32)
    for j in range(1, unmasked_end):
        O, P, m_i, l_i, alpha = _attend_step(j, O, P, m_i, l_i, alpha, q, k_smem, v_smem, k_ready, k_empty,
                                             v_ready, v_empty, turn, qk_scale, seq_len, WG, False, BLOCK_N,
                                             HEAD_DIM, STAGES, PINGPONG, tiles.KEYS_PERMUTED, tiles.DIAG, s_layout,
                                             o_layout, p_layout)
    if ragged & (num_blocks > 1):
        O, P, m_i, l_i, alpha = _attend_step(num_blocks - 1, O, P, m_i, l_i, alpha, q, k_smem, v_smem, k_ready,
                                             k_empty, v_ready, v_empty, turn, qk_scale, seq_len, WG, True,
                                             BLOCK_N, HEAD_DIM, STAGES, PINGPONG, tiles.KEYS_PERMUTED, tiles.DIAG, s_layout,
                                             o_layout, p_layout)

    # The last block's P x V.
    last = num_blocks - 1
    mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
    _take_turn(turn, WG, num_blocks, PINGPONG)
    pv = warpgroup_mma(P, v_smem.index(last % STAGES).permute((1, 0)),
                       gl.zeros([HALF, HEAD_DIM], gl.float32, o_layout), use_acc=False, is_async=True)
    _end_turn(turn, WG, PINGPONG)
    pv = warpgroup_mma_wait(num_outstanding=0, deps=(pv, ))  # no more loads: V tiles need no release now
    O = O * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1) + pv

    out = O * gl.expand_dims(gl.convert_layout(v_scale / l_i, gl.SliceLayout(1, o_layout)), 1)  # l_i sums 448 P
    rows = row0 + WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, o_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    ptrs = O_ptr + gl.expand_dims(rows, 1) * stride_ol + gl.expand_dims(cols, 0)
    gl.store(ptrs, out.to(O_ptr.dtype.element_ty), mask=gl.expand_dims(rows < seq_len, 1))


@gluon.jit
def _consumer_1(q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn, O_ptr, Scales,
                sm_scale_log2, seq_len, row0, stride_ol, num_blocks, tiles):
    _consumer(1, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn, O_ptr, Scales,
              sm_scale_log2, seq_len, row0, stride_ol, num_blocks, tiles)


@gluon.jit
def _consumer_0(q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn, O_ptr, Scales,
                sm_scale_log2, seq_len, row0, stride_ol, num_blocks, tiles):
    _consumer(0, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn, O_ptr, Scales,
              sm_scale_log2, seq_len, row0, stride_ol, num_blocks, tiles)


@gluon.jit
def fp8_attention_hopper_kernel(q_desc, k_desc, v_desc, O, Scales, sm_scale_log2, seq_len, num_heads,
                                stride_ob, stride_ol, stride_oh,
                                BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                                PINGPONG: gl.constexpr, KEYS_PERMUTED: gl.constexpr, DIAG: gl.constexpr,
                                CONSUMER_REGS: gl.constexpr):
    start_m = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    row0 = start_m * BLOCK_M
    num_blocks = gl.cdiv(seq_len, BLOCK_N)

    q_smem = gl.allocate_shared_memory(gl.float8e4nv, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, HEAD_DIM, BLOCK_N], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # both consumer warpgroups release each tile
        mbarrier.init(v_empty.index(i), count=2)
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)

    O_ptr = O + b * stride_ob + h * stride_oh
    tiles = _Tiles(BLOCK_N, HEAD_DIM, STAGES, PINGPONG, KEYS_PERMUTED, DIAG)
    consumer_args = (q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn, O_ptr, Scales,
                     sm_scale_log2, seq_len, row0, stride_ol, num_blocks, tiles)
    producer_args = (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                     bh * seq_len + row0, bh * seq_len, bh * HEAD_DIM, num_blocks, tiles)
    gl.warp_specialize([
        (_consumer_0, consumer_args),
        (_consumer_1, consumer_args),
        (_producer, producer_args),
    ], [4, 1], [CONSUMER_REGS, 24])


def key_order(seq_len: int) -> torch.Tensor:
    """The key at each position of a KEYS_PERMUTED V^T: within each 32 keys, position 32kk + 16h + 4q + 2g + e
    holds key 32kk + 16h + 8g + 2q + e (the score layout's column for that A-operand slot)."""
    pos = torch.arange(seq_len)
    kk, h, q, g, e = pos // 32, pos // 16 % 2, pos // 4 % 4, pos // 2 % 2, pos % 2
    return 32 * kk + 16 * h + 8 * g + 2 * q + e


def _descriptors(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, block_n: int):
    batch, heads, seq_len, head_dim = q8.shape
    fp8 = gl.float8e4nv
    q_layout = gl.NVMMASharedLayout.get_default_for([QUERY_ROWS, head_dim], fp8)
    k_layout = gl.NVMMASharedLayout.get_default_for([block_n, head_dim], fp8)
    v_layout = gl.NVMMASharedLayout.get_default_for([head_dim, block_n], fp8)
    rows = batch * heads * seq_len
    # Q and K as [B*H*L, D]: a tile running past a head's last row reads the next head's rows (or TMA's
    # zeros past the end); those query rows are not stored and those keys are masked. V^T as [B*H*D, L]
    # with its padded row stride: TMA fills the keys past L with zeros, never the padding's bytes.
    q_desc = TensorDescriptor(q8, [rows, head_dim], [head_dim, 1], [QUERY_ROWS, head_dim], q_layout)
    k_desc = TensorDescriptor(k8, [rows, head_dim], [head_dim, 1], [block_n, head_dim], k_layout)
    v_desc = TensorDescriptor(vt8, [batch * heads * head_dim, seq_len], [vt8.stride(2), 1], [head_dim, block_n],
                              v_layout)
    return q_desc, k_desc, v_desc


def fp8_attention_hopper(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, scales: torch.Tensor,
                         out_dtype: torch.dtype, block_n: int = 128, stages: int = 2, pingpong: bool = True,
                         keys_permuted: bool = False, consumer_regs: int = 240, diag: int = 0) -> torch.Tensor:
    """q8, k8 [B, H, L, D] contiguous and vt8 [B, H, D, L] (rows 16-byte aligned), float8_e4m3fn; scales
    float32 [3] (Q, K, V) -> O [B, L, H, D] in out_dtype. Compute capability 9.0 only."""
    batch, heads, seq_len, head_dim = q8.shape
    for name, t in (("q8", q8), ("k8", k8)):
        if t.dtype != torch.float8_e4m3fn or not t.is_contiguous():
            raise ValueError(f"fp8_attention_hopper: {name} must be contiguous float8_e4m3fn [B, H, L, D], got "
                             f"{t.dtype} with strides {t.stride()}")
    if tuple(k8.shape) != tuple(q8.shape):
        raise ValueError(f"fp8_attention_hopper: k8 has shape {tuple(k8.shape)}, expected {tuple(q8.shape)}")
    if (vt8.dtype != torch.float8_e4m3fn or tuple(vt8.shape) != (batch, heads, head_dim, seq_len)
            or vt8.stride(3) != 1 or vt8.stride(2) % 16 or vt8.stride(1) != head_dim * vt8.stride(2)
            or vt8.stride(0) != heads * vt8.stride(1)):
        raise ValueError(f"fp8_attention_hopper: vt8 must be float8_e4m3fn [B, H, D, L] = "
                         f"{(batch, heads, head_dim, seq_len)} over storage [B, H, D, L padded to 16], got "
                         f"{vt8.dtype} {tuple(vt8.shape)} with strides {vt8.stride()}")
    if head_dim not in (64, 128):
        raise ValueError(f"fp8_attention_hopper: head width {head_dim}; the kernel takes 64 or 128")
    if scales.shape != (3,) or scales.dtype != torch.float32:
        raise ValueError(f"fp8_attention_hopper: scales must be float32 [3] (Q, K, V), got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    out = torch.empty(batch, seq_len, heads, head_dim, device=q8.device, dtype=out_dtype)
    q_desc, k_desc, v_desc = _descriptors(q8, k8, vt8, block_n)
    grid = (triton.cdiv(seq_len, QUERY_ROWS), batch * heads)
    fp8_attention_hopper_kernel[grid](q_desc, k_desc, v_desc, out, scales, head_dim ** -0.5 * LOG2E, seq_len, heads,
                                      out.stride(0), out.stride(1), out.stride(2),
                                      BLOCK_N=block_n, HEAD_DIM=head_dim, STAGES=stages, PINGPONG=pingpong,
                                      KEYS_PERMUTED=keys_permuted, DIAG=diag, CONSUMER_REGS=consumer_regs, num_warps=4)
    return out
