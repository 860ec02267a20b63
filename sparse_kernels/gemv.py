"""The Triton sparse GEMV: y = (x * (|x| > t_s)) @ W_s for each output segment s of a weight
stored [in, out] row-major, so a skipped input channel is one skipped contiguous row.

Work decomposition: a 2-D grid over (output blocks, split-K row ranges). Program (n, k) reads only
the weight rows of its range whose input channel is active, BLOCK_K rows a tile, and writes an fp32
partial of its output block. Two loops, a per-shape choice (Config.compact): "masked" walks the
range and masks inactive rows (a masked load issues no memory traffic); "compact" first packs the
active channels' indices into scratch, then streams full tiles of active rows only, so the loads in
flight do not thin out as sparsity grows. The last of the split_k programs of a block to finish
sums the partials in split order (deterministic) and writes y in x's dtype: one launch per call,
no second pass over memory, no atomics on y. For a decode step the same launch can make its input
(RMSNorm of the residual stream, once per program, before the loop), add a residual to y (the last
arriver) and count the active channels (one atomic per program of a segment's first block).

Imported only when a call runs on Triton (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1),
so that TRITON_INTERPRET is read at first use rather than at `import sparse_kernels`.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_SEGMENTS = 3  # q, k, v
MAX_ROWS = 16  # rows of x one launch handles; ops.py sends more to a masked dense matmul


@triton.jit
def _block_columns(pid_n, N, split1, split2, BLOCK_N: tl.constexpr):
    """Output block pid_n -> (segment, first column, end column, the segment's first block).

    Segment s spans columns [c_s, c_s+1) with c = (0, split1, split2, N) and owns
    cdiv(c_s+1 - c_s, BLOCK_N) blocks, numbered after those of segment s - 1: no block straddles
    two segments, so each program reads one threshold. Missing segments have zero width.
    """
    nb0 = tl.cdiv(split1, BLOCK_N)
    nb01 = nb0 + tl.cdiv(split2 - split1, BLOCK_N)
    seg = (pid_n >= nb0).to(tl.int32) + (pid_n >= nb01).to(tl.int32)
    start = tl.where(seg == 0, pid_n * BLOCK_N,
                     tl.where(seg == 1, split1 + (pid_n - nb0) * BLOCK_N, split2 + (pid_n - nb01) * BLOCK_N))
    end = tl.where(seg == 0, split1, tl.where(seg == 1, split2, N))
    first = tl.where(seg == 0, 0, tl.where(seg == 1, nb0, nb01))
    return seg, start, end, first


@triton.jit
def _load_input(x_ptr, g_ptr, rows, ok, K, eps, PROLOGUE: tl.constexpr, NORM_BLOCK: tl.constexpr):
    """The projection's input at rows, fp32. PROLOGUE 1: RMSNorm(x) * g over x's K entries;
    2: silu(gate) * up with x = [gate | up]. Each step is rounded to x's dtype as the unfused model
    rounds it, so the threshold sees the values it would see there."""
    dtype = x_ptr.dtype.element_ty
    a = tl.load(x_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    if PROLOGUE == 1:
        g = tl.load(g_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        # The whole row's rms, loaded after (so in flight beside) the loads above.
        hs = tl.arange(0, NORM_BLOCK)  # [NORM_BLOCK]
        h = tl.load(x_ptr + hs, mask=hs < K, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / K + eps)
        a = ((a * rstd).to(dtype).to(tl.float32) * g).to(dtype).to(tl.float32)
    elif PROLOGUE == 2:
        up = tl.load(x_ptr + K + rows, mask=ok, other=0.0).to(tl.float32)
        a = ((a / (1.0 + tl.exp(-a))).to(dtype).to(tl.float32) * up).to(dtype).to(tl.float32)
    return a


@triton.jit
def _output(y, res_ptr, offs, ok, y_ptr, HAS_RESIDUAL: tl.constexpr):
    """fp32 sums -> y_ptr's dtype; with a residual, res + y rounded as two dtype tensors add."""
    dtype = y_ptr.dtype.element_ty
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        y = res + y.to(dtype).to(tl.float32)
    return y.to(dtype)


@triton.jit
def _sparse_gemv_kernel(
    x_ptr, w_ptr, t_ptr, y_ptr, partial_ptr, count_ptr, index_ptr, value_ptr, g_ptr, res_ptr, kept_ptr,
    M, K, N, split1, split2, rows_per_split, eps,
    stride_xm, stride_ym, stride_t,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    REDUCE_SPLITS: tl.constexpr, EVEN_N: tl.constexpr, DOT_FP32: tl.constexpr,
    COMPACT: tl.constexpr, COMPACT_BLOCK: tl.constexpr,
    PROLOGUE: tl.constexpr, NORM_BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, COUNT: tl.constexpr,
):
    """Program (pid_n, pid_k): rows [pid_k * rows_per_split, +rows_per_split) of W's output block
    pid_n times the same channels of x's BLOCK_M rows (BLOCK_M = 1: FMA on CUDA cores; 16: tl.dot
    on the union of the rows' active channels).

    BLOCK_M = 1 only: PROLOGUE makes the input from x inside the loads (_load_input), and COUNT
    adds the number of active channels of each segment into kept_ptr (int64 [n_segments]): the
    first block of a segment counts them, its split_k programs one range each. Any BLOCK_M:
    HAS_RESIDUAL returns res + y, y rounded to x's dtype first, as the unfused model adds."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_blocks = tl.num_programs(0)
    split_k = tl.num_programs(1)
    seg, col_start, col_end, first_block = _block_columns(pid_n, N, split1, split2, BLOCK_N)
    t = tl.load(t_ptr + seg * stride_t)
    cols = col_start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    col_ok = cols < col_end
    ms = tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_start = pid_k * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, K)

    if BLOCK_M == 1 and COMPACT:
        # Phase 1: the indices and values of this program's active channels, packed into its own
        # scratch slots (one pass: rows_per_split <= COMPACT_BLOCK), so that phase 2 loads full
        # tiles whatever the sparsity.
        scratch = (pid_k * n_blocks + pid_n) * rows_per_split
        rows = row_start + tl.arange(0, COMPACT_BLOCK)  # [COMPACT_BLOCK]
        x = _load_input(x_ptr, g_ptr, rows, rows < row_end, K, eps, PROLOGUE, NORM_BLOCK)
        active = (tl.abs(x) > t) & (rows < row_end)
        slot = scratch + tl.cumsum(active.to(tl.int32), axis=0) - 1  # [COMPACT_BLOCK]
        tl.store(index_ptr + slot, rows, mask=active)
        tl.store(value_ptr + slot, x, mask=active)
        n_active = tl.sum(active.to(tl.int32), axis=0)
        kept = n_active
        tl.debug_barrier()  # phase 2's threads read slots that other threads wrote
        # Phase 2: BLOCK_K active rows a tile. Weights run one tile ahead of the sum, indices two,
        # so a tile's rows are in flight while the previous tile is summed.
        ks = tl.arange(0, BLOCK_K)  # [BLOCK_K]
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        idx = tl.load(index_ptr + scratch + ks, mask=ks < n_active, other=0)
        val = tl.load(value_ptr + scratch + ks, mask=ks < n_active, other=0.0)
        if EVEN_N:
            w_mask = (ks < n_active)[:, None]
        else:
            w_mask = (ks < n_active)[:, None] & col_ok[None, :]
        w = tl.load(w_ptr + idx[:, None] * N + cols[None, :], mask=w_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
        nk = BLOCK_K + ks
        idx_next = tl.load(index_ptr + scratch + nk, mask=nk < n_active, other=0)
        val_next = tl.load(value_ptr + scratch + nk, mask=nk < n_active, other=0.0)
        for j in range(0, n_active, BLOCK_K):
            nk = j + BLOCK_K + ks  # [BLOCK_K] slots of the next tile
            if EVEN_N:
                w_mask = (nk < n_active)[:, None]
            else:
                w_mask = (nk < n_active)[:, None] & col_ok[None, :]
            w_next = tl.load(w_ptr + idx_next[:, None] * N + cols[None, :], mask=w_mask, other=0.0)
            nnk = nk + BLOCK_K
            idx_after = tl.load(index_ptr + scratch + nnk, mask=nnk < n_active, other=0)
            val_after = tl.load(value_ptr + scratch + nnk, mask=nnk < n_active, other=0.0)
            acc += val[:, None] * w.to(tl.float32)
            w, val, idx_next, val_next = w_next, val_next, idx_after, val_after
        part = tl.sum(acc, axis=0)[None, :]  # [1, BLOCK_N]
    elif BLOCK_M == 1:
        if PROLOGUE != 0:
            # The prologue once for the whole range, into this program's scratch slots: the loop
            # then loads x as it does with no prologue, nothing more on its chain of loads.
            scratch = (pid_k * n_blocks + pid_n) * rows_per_split
            rr = tl.arange(0, COMPACT_BLOCK)  # [COMPACT_BLOCK]
            xr = _load_input(x_ptr, g_ptr, row_start + rr, row_start + rr < row_end, K, eps, PROLOGUE, NORM_BLOCK)
            tl.store(value_ptr + scratch + rr, xr, mask=rr < rows_per_split)
            tl.debug_barrier()  # the loop's threads read slots that other threads wrote
            src = value_ptr + scratch - row_start  # x of row r at src + r, fp32
        else:
            src = x_ptr
        # Weights run one tile ahead of the sum: a tile's active rows are in flight while the
        # previous tile is summed.
        ks = tl.arange(0, BLOCK_K)  # [BLOCK_K]
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        rows = row_start + ks
        x = tl.load(src + rows, mask=rows < row_end, other=0.0).to(tl.float32)
        active = (tl.abs(x) > t) & (rows < row_end)
        if EVEN_N:
            # No column mask: a mask constant along a row keeps the loads 16 bytes wide.
            w_mask = active[:, None]
        else:
            w_mask = active[:, None] & col_ok[None, :]
        w = tl.load(w_ptr + rows[:, None] * N + cols[None, :], mask=w_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
        for k in range(row_start, row_end, BLOCK_K):
            rows_next = k + BLOCK_K + ks  # [BLOCK_K]
            x_next = tl.load(src + rows_next, mask=rows_next < row_end, other=0.0).to(tl.float32)
            active_next = (tl.abs(x_next) > t) & (rows_next < row_end)
            if EVEN_N:
                w_mask = active_next[:, None]
            else:
                w_mask = active_next[:, None] & col_ok[None, :]
            w_next = tl.load(w_ptr + rows_next[:, None] * N + cols[None, :], mask=w_mask, other=0.0)
            # where, not a multiply by the mask: an inactive inf or NaN must contribute 0.
            acc += tl.where(active, x, 0.0)[:, None] * w.to(tl.float32)
            x, active, w = x_next, active_next, w_next
        part = tl.sum(acc, axis=0)[None, :]  # [1, BLOCK_N]
        if COUNT:
            kept = tl.zeros([], dtype=tl.int32)
            if pid_n == first_block:
                # After the loop and in the counting programs only, so the loop stays the plain
                # kernel's: under register_cap, a counter there would take the tiles' registers.
                for r0 in range(row_start, row_end, COMPACT_BLOCK):
                    rr = r0 + tl.arange(0, COMPACT_BLOCK)  # [COMPACT_BLOCK]
                    xr = tl.load(src + rr, mask=rr < row_end, other=0.0).to(tl.float32)
                    kept += tl.sum(((tl.abs(xr) > t) & (rr < row_end)).to(tl.int32), axis=0)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(row_start, row_end, BLOCK_K):
            rows = k + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            x_ok = (ms < M)[:, None] & (rows < row_end)[None, :]  # [BLOCK_M, BLOCK_K]
            x = tl.load(x_ptr + ms[:, None] * stride_xm + rows[None, :], mask=x_ok, other=0.0)
            active = (tl.abs(x.to(tl.float32)) > t) & x_ok
            any_active = tl.max(active.to(tl.int32), axis=0) > 0  # [BLOCK_K]: union over x's rows
            if EVEN_N:
                w_mask = any_active[:, None]
            else:
                w_mask = any_active[:, None] & col_ok[None, :]
            w = tl.load(w_ptr + rows[:, None] * N + cols[None, :], mask=w_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
            xm = tl.where(active, x, 0.0)
            if DOT_FP32:
                acc = tl.dot(xm.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")  # not tf32
            else:
                acc = tl.dot(xm.to(w.dtype), w, acc)
        part = acc  # [BLOCK_M, BLOCK_N]

    if BLOCK_M == 1 and COUNT:
        if pid_n == first_block:
            tl.atomic_add(kept_ptr + seg, kept.to(tl.int64))
    out_offs = ms[:, None] * stride_ym + cols[None, :]  # [BLOCK_M, BLOCK_N]
    out_ok = (ms < M)[:, None] & col_ok[None, :]
    if split_k == 1:
        tl.store(y_ptr + out_offs, _output(part, res_ptr, out_offs, out_ok, y_ptr, HAS_RESIDUAL), mask=out_ok)
    else:
        # Partials: [split_k, n_blocks, BLOCK_M * BLOCK_N] fp32, one dense tile per program.
        tile = ms[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]  # [BLOCK_M, BLOCK_N]
        tl.store(partial_ptr + (pid_k * n_blocks + pid_n) * (BLOCK_M * BLOCK_N) + tile, part)
        # All threads' partial stores happen before the counter moves (barrier, then release);
        # the program that sees split_k - 1 acquires every other program's partial.
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == split_k - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(0, split_k, REDUCE_SPLITS):
                ss = s + tl.arange(0, REDUCE_SPLITS)  # [REDUCE_SPLITS]
                base = (ss * n_blocks + pid_n) * (BLOCK_M * BLOCK_N)
                # .cg: read at L2, where the other SMs' partials are, never a stale L1 line.
                parts = tl.load(partial_ptr + base[:, None, None] + tile[None, :, :],
                                mask=(ss < split_k)[:, None, None], other=0.0,
                                cache_modifier=".cg")  # [REDUCE_SPLITS, BLOCK_M, BLOCK_N]
                total += tl.sum(parts, axis=0)
            tl.store(y_ptr + out_offs, _output(total, res_ptr, out_offs, out_ok, y_ptr, HAS_RESIDUAL), mask=out_ok)
            tl.store(count_ptr + pid_n, 0)  # reset for the next call and for CUDA-graph replays


@dataclass(frozen=True)
class Config:
    """One launch shape. split_k = cdiv(K, rows_per_program); rows_per_program is a multiple of
    block_k. compact: pack the active channels first (wins from ~50% sparsity on, costs 5-20% at 0%
    where it needs wide blocks), else mask the weight rows of inactive channels in place."""
    block_n: int
    block_k: int
    rows_per_program: int
    num_warps: int
    compact: bool


# Candidates that tune() measures: (block_n, block_k, num_warps) tiles of 16 or 32 KB of bf16, 64 fp32
# accumulators a thread, times rows per program, times the two loops.
TILES = [(256, 32, 4), (256, 64, 8), (128, 64, 4), (512, 32, 8), (512, 16, 4), (1024, 16, 8)]
ROWS_PER_PROGRAM = [128, 256, 512, 1024]
COMPACT_BLOCK = 1024  # the most rows one program compacts, in one pass
REGISTERS_PER_SM = 65536  # sm_70 to sm_100
CANDIDATES = [Config(n, k, r, w, c) for n, k, w in TILES for r in ROWS_PER_PROGRAM for c in (True, False)]

# Chosen by scripts/benchmark_gemv.py (tune() at 0% and 50% sparsity, bf16) on an H100 80GB HBM3,
# 2026-11-23, keyed by (in_features, splits). The same config serves every sparsity, so more
# sparsity only ever removes loads: the kernel stays monotone in sparsity.
TUNED = {
    (4096, (4096, 4096, 4096)): Config(512, 16, 256, 4, False),  # llama-2-7b qkv
    (4096, (4096,)): Config(128, 64, 512, 4, False),  # llama-2-7b o, llama-3-8b o
    (4096, (11008, 11008)): Config(512, 16, 512, 4, False),  # llama-2-7b gate_up
    (11008, (4096,)): Config(128, 64, 1024, 4, False),  # llama-2-7b down
    (4096, (11008,)): Config(128, 64, 1024, 4, False),  # llama-2-7b gate
    (4096, (4096, 1024, 1024)): Config(128, 64, 512, 4, False),  # llama-3-8b qkv
    (4096, (14336, 14336)): Config(1024, 16, 1024, 8, True),  # llama-3-8b gate_up
    (14336, (4096,)): Config(128, 64, 1024, 4, False),  # llama-3-8b down
    (4096, (14336,)): Config(128, 64, 1024, 4, False),  # llama-3-8b gate
    (8192, (8192, 1024, 1024)): Config(512, 16, 512, 4, False),  # llama-70b qkv
    (8192, (8192,)): Config(128, 64, 1024, 4, False),  # llama-70b o
    (8192, (28672, 28672)): Config(128, 64, 1024, 4, False),  # llama-70b gate_up
    (28672, (8192,)): Config(128, 64, 1024, 4, False),  # llama-70b down
    (8192, (28672,)): Config(1024, 16, 1024, 8, True),  # llama-70b gate
}

_tuned_here = {}  # tune() results of this process: (K, splits, dtype, BLOCK_M, device) -> Config
tune_log = []  # every (key, config, microseconds) tune() measured, for the benchmark's record


def _sm_count(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter runs programs one by one: few, but still more than one split


def register_cap(n_programs, num_warps, sms):
    """The most registers a thread may take for all n_programs to be resident at once, or None
    where that needs no cap (or cannot be had). The tuned grids are one wave of the plain masked
    loop (128 registers a thread at 4 warps); its fused forms (norm, residual, count) made ptxas
    take 168, one program an SM fewer, and then a second wave: down's 448 programs in 396 places,
    +10 us a call. Capped, they fit in 128 (the norm's prologue spills a few bytes)."""
    per_sm = triton.cdiv(n_programs, sms)
    cap = REGISTERS_PER_SM // (per_sm * 32 * num_warps) // 8 * 8  # allocated 8 a thread at a time
    return cap if 128 <= cap < 255 else None


def default_config(K, splits, device):
    """Without a tuned entry: the masked loop on 128-wide blocks (the best dense-to-50% choice for
    most tuned shapes) and enough split-K programs to fill each SM 3 deep."""
    block_n = min(128, max(16, triton.next_power_of_2(max(splits))))
    block_k = 64
    n_blocks = sum(triton.cdiv(w, block_n) for w in splits)
    split_k = max(1, min(triton.cdiv(3 * _sm_count(device), n_blocks), triton.cdiv(K, block_k)))
    rows = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    return Config(block_n, block_k, rows, 4, False)


def choose_config(K, splits, dtype, block_m, device):
    key = (K, tuple(splits), dtype, block_m, str(device))
    return _tuned_here.get(key) or TUNED.get((K, tuple(splits))) or default_config(K, splits, device)


class _Workspace:
    """Scratch shared by every call on one device: fp32 partials, per-block arrival counters, and
    the compacted active channels (int32 index, fp32 value) of each program.

    Calls on one stream run one after another and each leaves its counters at zero, so one
    workspace serves them all. Buffers only grow, and outside CUDA-graph capture; a replaced
    buffer is kept alive because a captured graph may still point at it.
    """

    KINDS = {"partials": torch.float32, "counters": torch.int32, "index": torch.int32, "value": torch.float32}

    def __init__(self):
        self.buffers = {}
        self.retired = []

    def get(self, device, **sizes):
        """sizes: elements needed per kind -> the buffers, in KINDS order."""
        have = self.buffers.setdefault(device, {})
        for kind, n in sizes.items():
            old = have.get(kind)
            if old is not None and old.numel() >= n:
                continue
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("sparse_linear needs a larger workspace during CUDA-graph capture: "
                                   "call it once with this shape before capturing (sparse_kernels.warm_up)")
            if old is not None:
                self.retired.append(old)
                n = max(n, 2 * old.numel())
            have[kind] = torch.zeros(max(n, 1 << 12), dtype=self.KINDS[kind], device=device)
        return [have[kind] for kind in self.KINDS if kind in sizes]


workspace = _Workspace()


def sparse_gemv(x, data, thresholds, splits, config=None, out=None, norm_weight=None, eps=0.0, swiglu=False,
                residual=None, kept=None):
    """x: [M, K] (M <= MAX_ROWS); data: [K, N] weight; thresholds: fp32 [n_segments] (any stride);
    splits: segment widths summing to N. Returns y: [M, N] in x's dtype (written into out if given).

    Fused around the product (ops.sparse_linear documents them): norm_weight (the input is
    RMSNorm(x) * norm_weight, eps) or swiglu (x: [1, 2K] = [gate | up], the input is silu(gate) * up),
    and kept (int64 [n_segments], += active channels), for M = 1 only; residual ([M, N]) for any M."""
    if norm_weight is not None and swiglu:
        raise ValueError("norm_weight and swiglu exclude each other: one prologue a launch")
    prologue = 1 if norm_weight is not None else 2 if swiglu else 0
    M = x.shape[0]
    K = x.shape[1] // 2 if swiglu else x.shape[1]  # the weight's in_features
    N = data.shape[1]
    if (data.shape[0] != K or x.shape[1] != (2 * K if swiglu else K) or not data.is_contiguous()
            or x.stride(1) != 1 or (prologue and not x.is_contiguous())):
        raise ValueError(f"x {tuple(x.shape)} (inner stride 1) and a contiguous [K, N] weight expected, got {tuple(data.shape)}")
    if x.dtype != data.dtype:
        raise ValueError(f"x is {x.dtype}, the weight {data.dtype}: the kernel computes in the weight's dtype")
    if not 1 <= M <= MAX_ROWS or not 1 <= len(splits) <= MAX_SEGMENTS or sum(splits) != N:
        raise ValueError(f"{M} rows (1..{MAX_ROWS}) and splits {splits} (1..{MAX_SEGMENTS} segments summing to {N})")
    if K * N >= 2**31:
        raise ValueError("weights of 2**31 elements or more need 64-bit offsets")
    if thresholds.shape != (len(splits),) or thresholds.dtype != torch.float32:
        raise ValueError(f"thresholds must be fp32 [{len(splits)}], got {thresholds.dtype} {tuple(thresholds.shape)}")
    if (prologue or kept is not None) and M != 1:
        raise ValueError("the fused prologues and the kept count take one row of x")
    if norm_weight is not None and norm_weight.shape != (K,):
        raise ValueError(f"norm_weight must be [{K}]")
    if residual is not None and (residual.shape != (M, N) or residual.dtype != x.dtype or residual.stride() != (N, 1)):
        raise ValueError(f"residual must be a contiguous [{M}, {N}] {x.dtype} tensor")
    if kept is not None and (kept.shape != (len(splits),) or kept.dtype != torch.int64):
        raise ValueError(f"kept must be int64 [{len(splits)}]")
    block_m = 1 if M == 1 else 16  # tl.dot wants at least 16 rows
    cfg = config or choose_config(K, splits, data.dtype, block_m, x.device)
    rows = cfg.rows_per_program
    if block_m > 1:
        # Fewer, longer splits: the reduction reads 16 rows of partials per split.
        rows = max(rows, triton.cdiv(triton.cdiv(K, 8), cfg.block_k) * cfg.block_k)
    if prologue:
        rows = min(rows, COMPACT_BLOCK)  # the prologue runs over a program's rows in one pass
    split_k = triton.cdiv(K, rows)
    n_blocks = sum(triton.cdiv(w, cfg.block_n) for w in splits)
    bounds = [sum(splits[:i]) for i in range(1, MAX_SEGMENTS)] + [N] * (MAX_SEGMENTS - len(splits))
    compact = cfg.compact and block_m == 1 and rows <= COMPACT_BLOCK
    # Scratch: compacted channels, or the prologue's inputs; a slot per row a program owns. Sized
    # for whichever form a one-row call takes (rows <= COMPACT_BLOCK there), so that warming up
    # the plain call sizes it for the fused ones too: none may grow it inside a CUDA graph.
    slots = n_blocks * (K + COMPACT_BLOCK) if block_m == 1 else 1
    partials, counters, index, value = workspace.get(x.device, partials=split_k * n_blocks * block_m * cfg.block_n,
                                                      counters=n_blocks, index=slots, value=slots)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    # The plain form keeps the registers its config was tuned with (the compact loop needs ~200).
    fused = prologue or residual is not None or kept is not None
    cap = None
    if x.device.type == "cuda" and fused and not compact:
        cap = register_cap(n_blocks * split_k, cfg.num_warps, _sm_count(x.device))
    _sparse_gemv_kernel[(n_blocks, split_k)](
        x, data, thresholds, y, partials, counters, index, value,
        # Unused pointers get a tensor already at hand: the kernel never reads them.
        x if norm_weight is None else norm_weight, x if residual is None else residual, counters if kept is None else kept,
        M, K, N, bounds[0], bounds[1], rows, eps,
        x.stride(0), y.stride(0), thresholds.stride(0),
        BLOCK_M=block_m, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n,
        REDUCE_SPLITS=max(1, 16 // block_m), EVEN_N=all(w % cfg.block_n == 0 for w in splits),
        # fp32 weights need fp32 products; the interpreter's tl.dot cannot multiply bf16 (numpy has none).
        DOT_FP32=data.dtype == torch.float32 or x.device.type == "cpu",
        COMPACT=compact, COMPACT_BLOCK=COMPACT_BLOCK,
        PROLOGUE=prologue, NORM_BLOCK=triton.next_power_of_2(K) if prologue == 1 else 1,
        HAS_RESIDUAL=residual is not None, COUNT=kept is not None,
        num_warps=cfg.num_warps, **({} if cap is None else {"maxnreg": cap}),
    )
    return y


def weight_copies(nbytes, device):
    """How many copies of a weight of nbytes make 4x the L2: cycling through them, each call finds
    its weight cold, as each layer's projection does in a decode step."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(2, triton.cdiv(4 * l2, nbytes))


def time_in_graph(fns, flush_l2=False, replays=50):
    """Median microseconds per call of fns, run back to back from one CUDA graph as a compiled
    decode step runs them (eagerly, Python costs more than a small GEMV takes on the GPU).

    Give fns that read enough distinct weights (weight_copies) to find them cold. flush_l2=True
    times as triton's do_bench does, zeroing 256 MB before each replay: that leaves the L2 full of
    dirty lines, and the timed calls pay for writing them back (about 12 us on an H100), a cost a
    decode step, whose L2 holds the previous layer's clean weights, does not have.
    """
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    if flush_l2:
        return 1e3 * triton.testing.do_bench(graph.replay, warmup=5, rep=20, return_mode="median") / len(fns)
    for _ in range(3):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return 1e3 * sorted(s.elapsed_time(e) for s, e in events)[replays // 2] / len(fns)


def tune(K, splits, dtype=torch.bfloat16, rows=1, device="cuda", sparsities=(0.0, 0.5), candidates=None):
    """Time the candidate configs on random data at the given sparsities; keep the one with the
    least summed time for this (K, splits, dtype, rows, device) in this process. Returns it.

    Never call during CUDA-graph capture: it allocates and synchronizes. Call it (or warm_up) ahead.
    """
    device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", the form calls key on
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("tune() cannot run during CUDA-graph capture; tune before capturing")
    N = sum(splits)
    block_m = 1 if rows == 1 else 16
    Ws = [torch.randn(K, N, device=device, dtype=dtype) * 0.02 for _ in range(weight_copies(K * N * dtype.itemsize, device))]
    x = torch.randn(rows, K, device=device, dtype=dtype)
    best, best_time = None, float("inf")
    for cfg in candidates or CANDIDATES:
        times = []
        for s in sparsities:
            t = torch.full((len(splits),), torch.quantile(x.float().abs().flatten(), s).item() if s > 0 else 0.0, device=device)
            times.append(time_in_graph([lambda W=W: sparse_gemv(x, W, t, splits, cfg) for W in Ws]))
        tune_log.append(((K, tuple(splits), str(dtype), rows), cfg, times))
        total = sum(times)
        if total < best_time:
            best, best_time = cfg, total
    _tuned_here[(K, tuple(splits), dtype, block_m, str(device))] = best
    return best
