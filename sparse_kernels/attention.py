"""Decode attention in one launch: rope the new token's q and k, write its k and v into the caches,
and attend over cache positions 0..pos (flash-decoding).

Work decomposition: a 2-D grid over (batch x q head, splits of the cache). Program (bh, s) attends
q head h over positions [s * chunk, min((s + 1) * chunk, pos + 1)), BLOCK_T a tile, with an online
softmax, and writes an fp32 partial (running max, sum, weighted values). The new token's k and v
come from qkv in registers, not from the cache, so no program waits for another's cache write. The
last of a head's n_splits programs to finish combines the partials in split order (deterministic)
and writes y: one launch, no second pass. The grid depends on (B * n_head, S, device) only, never on
pos, which is read on the device: one CUDA graph serves every position.

Imported only when a call runs on Triton (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1),
as gemv.py is.
"""
import math

import torch
import triton
import triton.language as tl

from sparse_kernels.gemv import _sm_count, workspace

# Measured on an H100 (bf16, one CUDA graph): 64-position tiles and ~4 programs an SM beat 32 and
# 2 by 1.2x-2x from S = 1024 to 8192 (Llama-3-8B heads at S = 8192: 38 us against 77 us).
BLOCK_T = 64  # cache positions a tile
PROGRAMS_PER_SM = 4
MAX_SPLITS = 64  # the combine holds [n_splits, D] partials in registers


@triton.jit
def _rope(ptr, cos, sin, D: tl.constexpr):
    """rope(x) = rd(rd(x * cos) + rd(rot(x) * sin)) for the D values at ptr, rd = rounding to x's
    dtype after each op as eager torch does; rot(x) = cat(-x[D/2:], x[:D/2]). Returns fp32."""
    d = tl.arange(0, D)  # [D]
    x = tl.load(ptr + d)
    half = tl.load(ptr + (d + D // 2) % D).to(tl.float32)  # [D]: x[D/2:], x[:D/2]
    rot = tl.where(d < D // 2, -half, half)  # negated in fp32, exactly: the interpreter stores bf16 as raw bits
    a = (x.to(tl.float32) * cos).to(x.dtype)
    b = (rot * sin).to(x.dtype)
    return (a.to(tl.float32) + b.to(tl.float32)).to(x.dtype).to(tl.float32)


@triton.jit
def _decode_attention_kernel(
    qkv_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pos_ptr, y_ptr, partial_ptr, count_ptr,
    S, chunk, n_head, n_kv_head, qk_scale,
    D: tl.constexpr, BLOCK_T: tl.constexpr, SPLITS: tl.constexpr,
):
    """Program (bh, s): q head bh % n_head of sequence bh // n_head against split s of its kv
    head's cache; scores are in log2 units (qk_scale folds log2(e) / sqrt(D)) so exp2 serves."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = bh // n_head
    h = bh % n_head
    group = n_head // n_kv_head
    g = h // group
    pos = tl.load(pos_ptr).to(tl.int32)
    d = tl.arange(0, D)  # [D]
    ts = tl.arange(0, BLOCK_T)  # [BLOCK_T]
    cos = tl.load(cos_ptr + d).to(tl.float32)
    sin = tl.load(sin_ptr + d).to(tl.float32)

    row = qkv_ptr + b * ((n_head + 2 * n_kv_head) * D)  # [(n_head + 2 n_kv_head) * D]: q | k | v
    q = _rope(row + h * D, cos, sin, D) * qk_scale  # [D]
    cache = ((b * n_kv_head + g) * S).to(tl.int64) * D  # this kv head's [S, D] slab
    k_ptr = k_cache_ptr + cache
    v_ptr = v_cache_ptr + cache

    start = split * chunk
    end = tl.minimum(start + chunk, pos)  # cached positions; pos itself comes from registers
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([D], dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + ts  # [BLOCK_T]
        # Masked loads never read slots >= end: slots after pos may hold anything, NaN included.
        ok = t < end
        k = tl.load(k_ptr + t[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)  # [BLOCK_T, D]
        v = tl.load(v_ptr + t[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)  # [BLOCK_T, D]
        scores = tl.where(ok, tl.sum(q[None, :] * k.to(tl.float32), axis=1), float("-inf"))  # [BLOCK_T]
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        p = tl.exp2(scores - m_new)  # [BLOCK_T]
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m = m_new
    if (start <= pos) & (pos < start + chunk):
        k_new = _rope(row + (n_head + g) * D, cos, sin, D)  # [D]
        v_new = tl.load(row + (n_head + n_kv_head + g) * D + d)  # [D]
        if h % group == 0:  # one writer per (sequence, kv head)
            tl.store(k_ptr + pos * D + d, k_new.to(v_new.dtype))
            tl.store(v_ptr + pos * D + d, v_new)
        score = tl.sum(q * k_new, axis=0)
        m_new = tl.maximum(m, score)
        p = tl.exp2(score - m_new)
        alpha = tl.exp2(m - m_new)
        l = l * alpha + p
        acc = acc * alpha + p * v_new.to(tl.float32)
        m = m_new

    if n_splits == 1:
        tl.store(y_ptr + bh * D + d, (acc / l).to(y_ptr.dtype.element_ty))
    else:
        # Partials: acc [B * n_head, n_splits, D], then (m, l) [B * n_head, n_splits, 2], fp32.
        slot = bh * n_splits + split
        stats_ptr = partial_ptr + tl.num_programs(0) * n_splits * D
        tl.store(partial_ptr + slot * D + d, acc)
        tl.store(stats_ptr + slot * 2, m)
        tl.store(stats_ptr + slot * 2 + 1, l)
        # All threads' partial stores happen before the counter moves (barrier, then release);
        # the program that sees n_splits - 1 acquires every other program's partial.
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + bh, 1, sem="acq_rel", scope="gpu")
        if arrived == n_splits - 1:
            ss = tl.arange(0, SPLITS)  # [SPLITS]
            live = ss < n_splits
            slots = bh * n_splits + ss  # [SPLITS]
            # .cg: read at L2, where the other SMs' partials are, never a stale L1 line.
            ms = tl.load(stats_ptr + slots * 2, mask=live, other=float("-inf"), cache_modifier=".cg")
            ls = tl.load(stats_ptr + slots * 2 + 1, mask=live, other=0.0, cache_modifier=".cg")
            accs = tl.load(partial_ptr + slots[:, None] * D + d[None, :], mask=live[:, None], other=0.0,
                           cache_modifier=".cg")  # [SPLITS, D]
            m_all = tl.max(ms, axis=0)  # finite: the split holding pos attended to it
            w = tl.exp2(ms - m_all)  # [SPLITS]: 0 for empty splits (m = -inf, l = 0, acc = 0)
            total = tl.sum(accs * w[:, None], axis=0)  # [D]
            y = total / tl.sum(ls * w, axis=0)
            tl.store(y_ptr + bh * D + d, y.to(y_ptr.dtype.element_ty))
            tl.store(count_ptr + bh, 0)  # reset for the next call and for CUDA-graph replays


def split_plan(heads, S, device):
    """-> (n_splits, chunk): about PROGRAMS_PER_SM programs an SM over all heads (B * n_head), each
    split a whole number of tiles. Depends on no position, so one graph serves them all."""
    want = triton.cdiv(PROGRAMS_PER_SM * _sm_count(device), heads)
    n_splits = max(1, min(want, triton.cdiv(S, BLOCK_T), MAX_SPLITS))
    chunk = triton.cdiv(triton.cdiv(S, n_splits), BLOCK_T) * BLOCK_T
    return triton.cdiv(S, chunk), chunk


def attention_workspace_sizes(B, n_head, S, D, device):
    """Elements of workspace.get's kinds that decode_attention needs at these shapes."""
    n_splits, _ = split_plan(B * n_head, S, device)
    return {"partials": B * n_head * n_splits * (D + 2), "counters": B * n_head}


def warm_up_attention(B, n_head, S, D, device):
    """Grow the shared workspace for these shapes: call before capturing a CUDA graph."""
    workspace.get(torch.device(device), **attention_workspace_sizes(B, n_head, S, D, torch.device(device)))


def decode_attention(qkv, k_cache, v_cache, cos, sin, pos, n_head, n_kv_head, out=None):
    """One decode step of attention. qkv: [B, (n_head + 2 n_kv_head) * D] (q | k | v heads);
    k_cache, v_cache: [B, n_kv_head, S, D]; cos, sin: [D], the rotary row of position pos; pos: a
    1-element integer tensor, 0 <= pos < S. Writes rope(k) and v into the caches' slot pos and
    returns y: [B, n_head * D] in qkv's dtype (into out if given), softmax in fp32."""
    B, kv_heads, S, D = k_cache.shape
    if D < 2 or D & (D - 1) or kv_heads != n_kv_head or n_head % n_kv_head:
        raise ValueError(f"head_dim {D} must be a power of two, n_head {n_head} a multiple of n_kv_head "
                         f"{n_kv_head}, the caches [B, {n_kv_head}, S, D]; got {tuple(k_cache.shape)}")
    if qkv.shape != (B, (n_head + 2 * n_kv_head) * D) or v_cache.shape != k_cache.shape or cos.numel() != D \
            or sin.numel() != D or pos.numel() != 1:
        raise ValueError(f"qkv {tuple(qkv.shape)}, v_cache {tuple(v_cache.shape)}, cos/sin {cos.numel()}/"
                         f"{sin.numel()} elements, pos {pos.numel()} do not fit caches {tuple(k_cache.shape)}")
    tensors = (qkv, k_cache, v_cache, cos, sin)
    if any(t.dtype != qkv.dtype or not t.is_contiguous() for t in tensors) or pos.is_floating_point():
        raise ValueError("qkv, caches, cos and sin must be contiguous and of one dtype; pos an integer tensor")
    if out is not None and (out.shape != (B, n_head * D) or out.dtype != qkv.dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {qkv.dtype} [{B}, {n_head * D}], got {out.dtype} {tuple(out.shape)}")
    n_splits, chunk = split_plan(B * n_head, S, qkv.device)
    partials, counters = workspace.get(qkv.device, **attention_workspace_sizes(B, n_head, S, D, qkv.device))
    y = torch.empty(B, n_head * D, dtype=qkv.dtype, device=qkv.device) if out is None else out
    _decode_attention_kernel[(B * n_head, n_splits)](
        qkv, k_cache, v_cache, cos, sin, pos, y, partials, counters,
        S, chunk, n_head, n_kv_head, math.log2(math.e) / math.sqrt(D),
        D=D, BLOCK_T=BLOCK_T, SPLITS=triton.next_power_of_2(n_splits),
        # No fused multiply-adds: rope rounds x * cos to the dtype before adding, as eager torch
        # does; with fusion the GPU contracts it into one bf16 FMA (measured: 1-ulp differences).
        enable_fp_fusion=False,
    )
    return y
