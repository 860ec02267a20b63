"""Decode attention in one launch: rope the new token's q and k, write its k and v into the caches,
and attend over cache positions 0..pos (flash-decoding).

Work decomposition: a 2-D grid over (batch x kv head, splits of the cache). Program (bg, s) takes the
group = n_head // n_kv_head q heads that share kv head g as the rows of a [GROUP_BLOCK, D] tile and
attends them over split s of positions 0..pos, BLOCK_T a tile, with an online softmax per row: each
K/V tile is read once for the whole group, not once a q head. Both products are tensor-core dots
(tl.dot) accumulating in fp32, q [GROUP_BLOCK, D] x K^T [D, BLOCK_T] and p [GROUP_BLOCK, BLOCK_T] x
V [BLOCK_T, D]: written as fp32 broadcast products they held [GROUP_BLOCK, BLOCK_T, D] in registers
and spilled. GROUP_BLOCK is at least 16, the rows of one MMA instruction (m16n8k16), so a group of 1
to 16 q heads costs the same; padding rows repeat the last q head and are never stored.

The grid depends on (B * n_kv_head, S, device) only, so one CUDA graph serves every position; the
split of the pos + 1 live positions is made on the device from pos (split_chunk): whole tiles over
as many of the grid's splits as that needs, and the others exit at once. A short context in a long
cache (a chat's start) thus runs few splits, and one tile needs no combine.
With more than one live split, each writes an fp32 partial (running max, sum, weighted values) per
q head and the last of a kv head's live splits to finish combines them in split order
(deterministic): one launch, no second pass. The new token's k and v come from qkv in registers, not
from the cache, so no program waits for another's cache write; the one program whose split holds
pos writes them. cos and sin are the whole rotary tables, their row pos read here: a row gathered
outside would be one more small kernel a layer in a compiled step.

Imported only when a call runs on Triton (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1),
as gemv.py is.
"""
import math

import torch
import triton
import triton.language as tl

from sparse_kernels.workspace import sm_count, workspace

# 64 positions and 4 warps: 64-position tiles beat 32 at long caches, and take the fewest registers
# a byte of K/V tile with no spills; 8 warps won on Llama-70B heads only, and lost overall
# (benchmarks/DESIGN.md, decode attention).
BLOCK_T = 64  # cache positions a tile
NUM_WARPS = 4
# Two K/V tile buffers (38 KiB of shared memory a program) let up to 4 programs share an SM;
# triton's default three (70 KiB) fit three.
NUM_STAGES = 2
# The grid's splits: about this many programs an SM over all kv heads. 2 was the best all-round
# against 4 (and against at least 2 or 4 tiles a split) on Llama-3-8B, Llama-2-7B and 70B heads
# from 256 to 8192 positions; 4 takes a round of the combine more at long caches.
PROGRAMS_PER_SM = 2
MAX_SPLITS = 64  # bounds the partials' workspace and the combine's rounds
# Partial values (HEADS x splits x D) a round of the combine's loads takes, all q heads at once:
# combining one q head after another cost more, most where a group holds many q heads.
COMBINE_AT_ONCE = 8192


@triton.jit
def _rope(ptr, cos, sin, D: tl.constexpr):
    """rope(x) = rd(rd(x * cos) + rd(rot(x) * sin)) for the D values at ptr (a pointer: -> [D]; or
    [R, 1] pointers: -> [R, D]), rd = rounding to x's dtype after each op as eager torch does;
    rot(x) = cat(-x[D/2:], x[:D/2]). Returns fp32."""
    d = tl.arange(0, D)  # [D]
    x = tl.load(ptr + d)
    half = tl.load(ptr + (d + D // 2) % D).to(tl.float32)  # [D] or [R, D]: x[D/2:], x[:D/2]
    rot = tl.where(d < D // 2, -half, half)  # negated in fp32, exactly: the interpreter stores bf16 as raw bits
    a = (x.to(tl.float32) * cos).to(x.dtype)
    b = (rot * sin).to(x.dtype)
    return (a.to(tl.float32) + b.to(tl.float32)).to(x.dtype).to(tl.float32)


@triton.jit
def _combine(partial_ptr, stats_ptr, y_ptr, first, group, n_splits, live, D: tl.constexpr, HEADS: tl.constexpr,
             SPLITS: tl.constexpr):
    """y of q heads first..first + group from their first `live` partials: the whole group at once,
    SPLITS splits a round of loads, merged with an online softmax across rounds."""
    d = tl.arange(0, D)  # [D]
    hr = tl.arange(0, HEADS)  # [HEADS]
    m = tl.full([HEADS], float("-inf"), tl.float32)
    l = tl.zeros([HEADS], dtype=tl.float32)
    acc = tl.zeros([HEADS, D], dtype=tl.float32)
    for s0 in range(0, live, SPLITS):
        ss = s0 + tl.arange(0, SPLITS)  # [SPLITS]
        hs = (first + hr)[:, None] * n_splits + ss[None, :]  # [HEADS, SPLITS] partial slots
        ok = (hr < group)[:, None] & (ss < live)[None, :]
        # .cg: read at L2, where the other SMs' partials are, never a stale L1 line.
        ms = tl.load(stats_ptr + hs * 2, mask=ok, other=float("-inf"), cache_modifier=".cg")
        ls = tl.load(stats_ptr + hs * 2 + 1, mask=ok, other=0.0, cache_modifier=".cg")
        accs = tl.load(partial_ptr + hs[:, :, None] * D + d[None, None, :], mask=ok[:, :, None], other=0.0,
                       cache_modifier=".cg")  # [HEADS, SPLITS, D]
        # Finite for real heads (every live split attends, and a round holds one at least);
        # padding heads' NaN is never stored.
        m_new = tl.maximum(m, tl.max(ms, axis=1))  # [HEADS]
        alpha = tl.exp2(m - m_new)  # [HEADS]
        w = tl.exp2(ms - m_new[:, None])  # [HEADS, SPLITS]: 0 past live
        l = l * alpha + tl.sum(ls * w, axis=1)
        acc = acc * alpha[:, None] + tl.sum(accs * w[:, :, None], axis=1)
        m = m_new
    y = acc / l[:, None]  # [HEADS, D]
    tl.store(y_ptr + (first + hr)[:, None] * D + d[None, :], y.to(y_ptr.dtype.element_ty), mask=(hr < group)[:, None])


@triton.jit
def _attention_program(
    bg, split, n_bg, n_splits,
    qkv_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pos_ptr, y_ptr, partial_ptr, count_ptr,
    S, n_head, n_kv_head, qk_scale,
    D: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_BLOCK: tl.constexpr,
    HEADS: tl.constexpr, COMBINE_SPLITS: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Program (bg, s): the q heads of kv head g = bg % n_kv_head of sequence bg // n_kv_head, a
    row each, against split s of g's positions 0..pos; scores are in log2 units (qk_scale folds
    log2(e) / sqrt(D)) so exp2 serves. DOT_FP32: both dots in fp32, for fp32 caches and the
    interpreter. COMBINE_SPLITS: the splits a round of the combine's loads takes (all q heads).

    Returns whether this program wrote y's heads (its kv head's only live split, or the last
    arriver, which combines): the persistent decode kernel (persistent.py) signals them done then."""
    pos = tl.load(pos_ptr).to(tl.int32)
    # split_chunk on the device: the pos + 1 positions in live splits of chunk slots each.
    chunk = tl.cdiv(tl.cdiv(pos + 1, n_splits), BLOCK_T) * BLOCK_T
    live = tl.cdiv(pos + 1, chunk)
    wrote = split < 0  # splits from live on have nothing to attend and exit at once
    if split < live:
        b = bg // n_kv_head
        g = bg % n_kv_head
        group = n_head // n_kv_head
        d = tl.arange(0, D)  # [D]
        ts = tl.arange(0, BLOCK_T)  # [BLOCK_T]
        rows = tl.arange(0, GROUP_BLOCK)  # [GROUP_BLOCK]
        real = rows < group  # padding rows (up to GROUP_BLOCK) are computed but never stored
        heads = b * n_head + g * group + rows  # [GROUP_BLOCK]: the rows' q heads in y
        cos = tl.load(cos_ptr + pos * D + d).to(tl.float32)
        sin = tl.load(sin_ptr + pos * D + d).to(tl.float32)

        row = qkv_ptr + b * ((n_head + 2 * n_kv_head) * D)  # [(n_head + 2 n_kv_head) * D]: q | k | v
        # Padding rows repeat the group's last q head: in bounds and finite.
        q_ptr = row + (g * group + tl.minimum(rows, group - 1))[:, None] * D  # [GROUP_BLOCK, 1]
        # Exact: rope rounds to the dtype. The dot takes q unscaled, so it is not rounded twice.
        q = _rope(q_ptr, cos, sin, D).to(qkv_ptr.dtype.element_ty)  # [GROUP_BLOCK, D]
        cache = ((b * n_kv_head + g) * S).to(tl.int64) * D  # this kv head's [S, D] slab
        k_ptr = k_cache_ptr + cache
        v_ptr = v_cache_ptr + cache

        start = split * chunk
        end = tl.minimum(start + chunk, pos)  # cached positions; pos itself comes from registers
        m = tl.full([GROUP_BLOCK], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_BLOCK], dtype=tl.float32)
        acc = tl.zeros([GROUP_BLOCK, D], dtype=tl.float32)
        for t0 in range(start, end, BLOCK_T):
            t = t0 + ts  # [BLOCK_T]
            # Masked loads never read slots >= end: slots after pos may hold anything, NaN included.
            ok = t < end
            k = tl.load(k_ptr + t[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)  # [BLOCK_T, D]
            v = tl.load(v_ptr + t[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)  # [BLOCK_T, D]
            if DOT_FP32:
                qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")  # not tf32
            else:
                qk = tl.dot(q, tl.trans(k))  # [GROUP_BLOCK, BLOCK_T], fp32
            scores = tl.where(ok[None, :], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))  # [GROUP_BLOCK]
            p = tl.exp2(scores - m_new[:, None])  # [GROUP_BLOCK, BLOCK_T]
            alpha = tl.exp2(m - m_new)  # [GROUP_BLOCK]
            l = l * alpha + tl.sum(p, axis=1)
            # As flash attention: the product takes p rounded to v's dtype, m and l the fp32 p. The
            # fp32 path rounds it too, so the interpreter computes what the GPU does.
            pv = p.to(v.dtype)  # [GROUP_BLOCK, BLOCK_T]
            if DOT_FP32:
                acc = tl.dot(pv.to(tl.float32), v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
            else:
                acc = tl.dot(pv, v, acc * alpha[:, None])  # [GROUP_BLOCK, D], fp32
            m = m_new
        if split == live - 1:
            # The last live split holds pos: it writes the new row and is the only one to attend to
            # it, from registers.
            k_new = _rope(row + (n_head + g) * D, cos, sin, D)  # [D]
            v_new = tl.load(row + (n_head + n_kv_head + g) * D + d)  # [D]
            tl.store(k_ptr + pos * D + d, k_new.to(v_new.dtype))
            tl.store(v_ptr + pos * D + d, v_new)
            score = tl.sum(q.to(tl.float32) * k_new[None, :], axis=1) * qk_scale  # [GROUP_BLOCK]
            m_new = tl.maximum(m, score)
            p = tl.exp2(score - m_new)
            alpha = tl.exp2(m - m_new)
            l = l * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]
            m = m_new

        if live == 1:
            wrote = live == 1
            y = (acc / l[:, None]).to(y_ptr.dtype.element_ty)
            tl.store(y_ptr + heads[:, None] * D + d[None, :], y, mask=real[:, None])
        else:
            # Partials: acc [B * n_head, n_splits, D], then (m, l) [B * n_head, n_splits, 2], fp32.
            slots = heads * n_splits + split  # [GROUP_BLOCK]
            stats_ptr = partial_ptr + n_bg * group * n_splits * D
            tl.store(partial_ptr + slots[:, None] * D + d[None, :], acc, mask=real[:, None])
            tl.store(stats_ptr + slots * 2, m, mask=real)
            tl.store(stats_ptr + slots * 2 + 1, l, mask=real)
            # All threads' partial stores happen before the counter moves (barrier, then release);
            # the program that sees live - 1 acquires every other live program's partials.
            tl.debug_barrier()
            arrived = tl.atomic_add(count_ptr + bg, 1, sem="acq_rel", scope="gpu")
            wrote = arrived == live - 1
            if wrote:
                _combine(partial_ptr, stats_ptr, y_ptr, b * n_head + g * group, group, n_splits, live, D, HEADS, COMBINE_SPLITS)
                tl.store(count_ptr + bg, 0)  # reset for the next call and for CUDA-graph replays
    return wrote


@triton.jit
def _decode_attention_kernel(
    qkv_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pos_ptr, y_ptr, partial_ptr, count_ptr,
    S, n_head, n_kv_head, qk_scale,
    D: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_BLOCK: tl.constexpr,
    HEADS: tl.constexpr, COMBINE_SPLITS: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Program (bg, s) of the grid (batch x kv heads, splits of the cache): _attention_program."""
    _attention_program(tl.program_id(0), tl.program_id(1), tl.num_programs(0), tl.num_programs(1),
                       qkv_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pos_ptr, y_ptr, partial_ptr, count_ptr,
                       S, n_head, n_kv_head, qk_scale, D, BLOCK_T, GROUP_BLOCK, HEADS, COMBINE_SPLITS, DOT_FP32)


def split_plan(kv_heads, S, device):
    """-> n_splits, the grid's splits: about PROGRAMS_PER_SM programs an SM over all (sequence, kv
    head) pairs (kv_heads = B * n_kv_head), at most one a tile of the cache. Depends on no
    position, so one graph serves them all; the fewer kv heads, the more splits."""
    want = triton.cdiv(PROGRAMS_PER_SM * sm_count(device), kv_heads)
    return max(1, min(want, triton.cdiv(S, BLOCK_T), MAX_SPLITS))


def split_chunk(n_splits, pos):
    """-> (chunk, live): how the kernel splits positions 0..pos on the device, live splits of chunk
    slots (whole tiles); splits from live on exit at once."""
    chunk = triton.cdiv(triton.cdiv(pos + 1, n_splits), BLOCK_T) * BLOCK_T
    return chunk, triton.cdiv(pos + 1, chunk)


def attention_workspace_sizes(B, n_head, S, D, device, n_kv_head=None):
    """Elements of workspace.get's kinds that decode_attention needs at these shapes. Without
    n_kv_head (the model warms up knowing n_head only): enough for every n_kv_head dividing n_head,
    since one kv head takes the most splits and n_head kv heads the most counters."""
    n_splits = split_plan(B * (n_kv_head or 1), S, device)
    return {"partials": B * n_head * n_splits * (D + 2), "counters": B * (n_kv_head or n_head)}


def warm_up_attention(B, n_head, S, D, device, n_kv_head=None):
    """Grow the shared workspace for these shapes: call before capturing a CUDA graph."""
    device = torch.device(device)
    workspace.get(device, **attention_workspace_sizes(B, n_head, S, D, device, n_kv_head))


def decode_attention(*args, **kwargs):
    """attention_call's arguments; launches the kernel and returns y."""
    grid, kernel_args, meta, y = attention_call(*args, **kwargs)
    _decode_attention_kernel[grid](*kernel_args, **meta)
    return y


def attention_call(qkv, k_cache, v_cache, cos, sin, pos, n_head, n_kv_head, out=None):
    """The launch of one decode step of attention: -> (grid, arguments, meta, y). qkv: [B, (n_head + 2 n_kv_head) * D] (q | k | v heads);
    k_cache, v_cache: [B, n_kv_head, S, D]; cos, sin: [R, D] rotary tables (R > pos), of which row
    pos is used; pos: a 1-element integer tensor, 0 <= pos < S, read on the device. Writes rope(k)
    and v into the caches' slot pos and returns y: [B, n_head * D] in qkv's dtype (into out if
    given), softmax in fp32."""
    B, kv_heads, S, D = k_cache.shape
    if D < 16 or D & (D - 1) or kv_heads != n_kv_head or n_head % n_kv_head:  # tl.dot's inner size is >= 16
        raise ValueError(f"head_dim {D} must be a power of two >= 16, n_head {n_head} a multiple of n_kv_head "
                         f"{n_kv_head}, the caches [B, {n_kv_head}, S, D]; got {tuple(k_cache.shape)}")
    if qkv.shape != (B, (n_head + 2 * n_kv_head) * D) or v_cache.shape != k_cache.shape or cos.dim() != 2 \
            or cos.shape[1] != D or sin.shape != cos.shape or pos.numel() != 1:
        raise ValueError(f"qkv {tuple(qkv.shape)}, v_cache {tuple(v_cache.shape)}, cos/sin {tuple(cos.shape)}/"
                         f"{tuple(sin.shape)} (tables [R, {D}]), pos {pos.numel()} elements do not fit caches {tuple(k_cache.shape)}")
    tensors = (qkv, k_cache, v_cache, cos, sin)
    if any(t.dtype != qkv.dtype or not t.is_contiguous() for t in tensors) or pos.is_floating_point():
        raise ValueError("qkv, caches, cos and sin must be contiguous and of one dtype; pos an integer tensor")
    if out is not None and (out.shape != (B, n_head * D) or out.dtype != qkv.dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {qkv.dtype} [{B}, {n_head * D}], got {out.dtype} {tuple(out.shape)}")
    n_splits = split_plan(B * n_kv_head, S, qkv.device)
    partials, counters = workspace.get(qkv.device, **attention_workspace_sizes(B, n_head, S, D, qkv.device, n_kv_head))
    y = torch.empty(B, n_head * D, dtype=qkv.dtype, device=qkv.device) if out is None else out
    heads = triton.next_power_of_2(n_head // n_kv_head)
    args = (qkv, k_cache, v_cache, cos, sin, pos, y, partials, counters, S, n_head, n_kv_head, math.log2(math.e) / math.sqrt(D))
    meta = dict(
        D=D, BLOCK_T=BLOCK_T, GROUP_BLOCK=max(16, heads), HEADS=heads,
        # A power of two: the largest that keeps a round within COMBINE_AT_ONCE values, and no
        # more than the grid's splits.
        COMBINE_SPLITS=min(triton.next_power_of_2(n_splits), max(1, triton.next_power_of_2(COMBINE_AT_ONCE // (heads * D) + 1) // 2)),
        # fp32 caches need fp32 products; the interpreter's tl.dot cannot multiply bf16 (numpy has none).
        DOT_FP32=qkv.dtype == torch.float32 or qkv.device.type == "cpu",
        # No fused multiply-adds: rope rounds x * cos to the dtype before adding, as eager torch
        # does; with fusion the GPU contracts it into one FMA, and the cache row differs by 1 ulp.
        enable_fp_fusion=False, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return (B * n_kv_head, n_splits), args, meta, y
