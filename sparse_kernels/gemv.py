"""The Triton sparse GEMV: y = (x * (|x| > t_s)) @ W_s for each output segment s of a weight
stored [in, out] row-major, so a skipped input channel is one skipped contiguous row.

Work decomposition: a 2-D grid over (output blocks, split-K row ranges). Program (n, k) reads only
the weight rows of its range whose input channel is active, BLOCK_K rows a tile, and writes an fp32
partial of its output block. Two loops, a per-shape choice (Config.compact): "masked" walks the
range and masks inactive rows (a masked load issues no memory traffic); "compact" first packs the
active channels' indices into scratch, then streams full tiles of active rows only, so the loads in
flight do not thin out as sparsity grows and the arithmetic shrinks with the bytes (int4: each
group's active rows padded to whole tiles, a tile in one group). A program may take several
consecutive blocks (Config.blocks_per_program): what depends only on its rows (the compacted list,
a prologue's inputs) is then made once for all of them, and a large projection's grid stays one
wave of resident programs instead of paying that start again each wave. The last of the split_k
programs of a block to finish sums the partials in split order (deterministic) and writes y in x's
dtype: one launch per call, no second pass over memory, no atomics on y. For a decode step the same launch can make its input
(RMSNorm of the residual stream, once per program, before the loop), add a residual to y (the last
arriver) and count the active channels (one atomic per program of a segment's first block).

The weight format is a parameter (WFMT, packed.py documents the layouts), dequantized in registers:
float tiles as they are; int8 tiles as integers, their column's scale applied once to the program's
sum; int4 tiles to the exact fp32 weight (q - zero) * scale, one FMA a value from 1 + q / 16 and
the group's two per-column constants, loaded once a group (a program spans whole groups; each
tile lies in one). Products and sums are fp32.

Imported only when a call runs on Triton (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1),
so that TRITON_INTERPRET is read at first use rather than at `import sparse_kernels`.
"""
import dataclasses

import torch
import triton
import triton.language as tl

from sparse_kernels.configs import Config, choose_config
from sparse_kernels.packed import segment_bytes
from sparse_kernels.workspace import sm_count, workspace

MAX_SEGMENTS = 3  # q, k, v
MAX_ROWS = 16  # rows of x one launch handles; ops.py sends more to a masked dense matmul
COMPACT_BLOCK = 1024  # the most rows one program compacts, in one pass
REGISTERS_PER_SM = 65536  # sm_70 to sm_100
FLOAT, INT8, INT4 = 0, 1, 2  # WFMT


@triton.jit
def _program_blocks(pid_n, N, split1, split2, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr):
    """Program pid_n -> (segment, its first output block, the end of its blocks, the segment's first
    column, the segment's end column, the segment's first block, the blocks of all segments).

    Segment s spans columns [c_s, c_s+1) with c = (0, split1, split2, N) and owns
    nb_s = cdiv(c_s+1 - c_s, BLOCK_N) blocks, numbered after those of segment s - 1, and
    cdiv(nb_s, BLOCKS) programs of BLOCKS consecutive blocks (its last one maybe fewer): no block
    or program straddles two segments, so each program reads one threshold. Missing segments have
    zero width.
    """
    nb0 = tl.cdiv(split1, BLOCK_N)
    nb1 = tl.cdiv(split2 - split1, BLOCK_N)
    nb2 = tl.cdiv(N - split2, BLOCK_N)
    p0 = tl.cdiv(nb0, BLOCKS)
    p01 = p0 + tl.cdiv(nb1, BLOCKS)
    seg = (pid_n >= p0).to(tl.int32) + (pid_n >= p01).to(tl.int32)
    seg_start = tl.where(seg == 0, 0, tl.where(seg == 1, split1, split2))
    seg_end = tl.where(seg == 0, split1, tl.where(seg == 1, split2, N))
    first = tl.where(seg == 0, 0, tl.where(seg == 1, nb0, nb0 + nb1))
    block0 = first + (pid_n - tl.where(seg == 0, 0, tl.where(seg == 1, p0, p01))) * BLOCKS
    block_end = tl.minimum(block0 + BLOCKS, first + tl.cdiv(seg_end - seg_start, BLOCK_N))
    return seg, block0, block_end, seg_start, seg_end, first, nb0 + nb1 + nb2


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
def _load_weights(w_ptr, rows, cols, word_cols, row_ok, col_ok, word_ok, N, NW, WFMT: tl.constexpr, EVEN_N: tl.constexpr):
    """The weight rows `rows` ([BLOCK_K]) at columns `cols` ([BLOCK_N]) as stored: [BLOCK_K, BLOCK_N]
    (float, int8), or int4's 32-bit words [BLOCK_K, BLOCK_N // 8] (word_cols, of NW a row), eight
    nibbles each. Rows not row_ok are never read. Held so, not as fp32, while in flight: half the
    registers (a quarter for int8, an eighth for int4)."""
    # One return after constexpr branches: Triton's compiler types a return inside a taken
    # constexpr branch together with the one after it.
    if WFMT == 2:
        if EVEN_N:
            ok = row_ok[:, None]  # a mask constant along a row keeps the loads wide
        else:
            ok = row_ok[:, None] & word_ok[None, :]
        words = w_ptr.to(tl.pointer_type(tl.int32))  # the uint8 data, four bytes a load
        w = tl.load(words + rows[:, None] * NW + word_cols[None, :], mask=ok, other=0)
    else:
        if EVEN_N:
            ok = row_ok[:, None]
        else:
            ok = row_ok[:, None] & col_ok[None, :]
        w = tl.load(w_ptr + rows[:, None] * N + cols[None, :], mask=ok, other=0)
    return w


@triton.jit
def _nibble_float(shifted, ASM: tl.constexpr):
    """The nibble at bits 19-22 of `shifted` as the float 1 + q / 16. ASM (CUDA): one lop3 with
    1.0's bits in a register; ptxas splits the plain expression in two, a SASS logic op taking one
    immediate (the interpreter runs the plain one)."""
    if ASM:
        one = tl.full(shifted.shape, 0x3F800000, tl.int32)
        f = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x780000, $2, 0xEA;", "=r,r,r", [shifted, one],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        f = ((shifted & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
    return f


@triton.jit
def _nibbles(w, ASM: tl.constexpr):
    """int4's 32-bit words [BLOCK_K, BLOCK_N // 8] -> 1 + q / 16, [BLOCK_K, BLOCK_N // 8, 2, 2, 2],
    column 8w + j at [:, w, j // 4, j // 2 % 2, j % 2] (nibble j of word w: byte j // 2, its high
    half for odd j). Left unreshaped, a nibble stays in the thread that loaded its word: a
    [BLOCK_K, BLOCK_N] tile would pass through shared memory every tile. Nibble j is shifted by
    19 - 4j to mantissa bits 19-22 under 1.0's exponent: a shift and a logic op a value."""
    # Even j (low nibbles), then odd j; an arithmetic >> fills above bit 22.
    low = tl.join(tl.join(_nibble_float(w << 19, ASM), _nibble_float(w << 3, ASM)),
                  tl.join(_nibble_float(w << 11, ASM), _nibble_float(w >> 5, ASM)))
    high = tl.join(tl.join(_nibble_float(w << 15, ASM), _nibble_float(w >> 1, ASM)),
                   tl.join(_nibble_float(w << 7, ASM), _nibble_float(w >> 9, ASM)))
    return tl.join(low, high)


@triton.jit
def _dequantize(w, a, b, WFMT: tl.constexpr, ASM: tl.constexpr):
    """A stored tile -> fp32: float [BLOCK_K, BLOCK_N] as it is; int8 [BLOCK_K, BLOCK_N] as integers
    (its scale comes after the sum); int4 as the weight a * (1 + q / 16) + b (_nibbles' order, with
    _int4_group's a and b of the tile's group).

    Integers become floats without a conversion instruction (a quarter of the FMA rate): bits set
    into a float's mantissa read as that float plus the integer times their place. int8: the sign
    bit flipped into the mantissa of 2**23, then 2**23 + 128 off (exact)."""
    if WFMT == 2:
        tile = _nibbles(w, ASM) * a[None, :, :, :, :] + b[None, :, :, :, :]
    elif WFMT == 1:
        q = w.to(tl.uint8, bitcast=True).to(tl.int32)
        tile = (q ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    else:
        tile = w.to(tl.float32)
    return tile


@triton.jit
def _int4_group(s_ptr, z_ptr, group, cols4, ok4, N):
    """int4 group `group`'s per-column constants at cols4 ([BLOCK_N // 8, 2, 2, 2], the tiles'
    column order): a = 16 * scale, b = -scale * (16 + zero), so that a * (1 + q / 16) + b is
    (q - zero) * scale, exactly (scale has 11 significant bits, 16 + q and 16 + zero five)."""
    scale = tl.load(s_ptr + group * N + cols4, mask=ok4, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + group * N + cols4, mask=ok4, other=0).to(tl.float32)
    return 16.0 * scale, -scale * (16.0 + zero)


@triton.jit
def _compact_tile(w_ptr, index_ptr, value_ptr, scratch, j, ks, n_slots, cols, word_cols, col_ok, word_ok, N, NW,
                  w, val, idx_next, val_next, acc, WFMT: tl.constexpr, EVEN_N: tl.constexpr, ASM: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """One step of the compact loop at slots j: loads the weights of the next tile's rows (idx_next)
    and the indices and values of the one after, then adds tile j's products (w, val) into acc
    (int4: sums of x (1 + q / 16), the caller applies the group's constants; else _acc_zeros' tile)."""
    nk = j + BLOCK_K + ks  # [BLOCK_K] slots of the next tile
    w_next = _load_weights(w_ptr, idx_next, cols, word_cols, idx_next >= 0, col_ok, word_ok, N, NW, WFMT, EVEN_N)
    idx_after = tl.load(index_ptr + scratch + nk + BLOCK_K, mask=nk + BLOCK_K < n_slots, other=-1)
    val_after = tl.load(value_ptr + scratch + nk + BLOCK_K, mask=nk + BLOCK_K < n_slots, other=0.0)
    if WFMT == 2:
        acc += tl.sum(val[:, None, None, None, None] * _nibbles(w, ASM), axis=0)
    else:
        acc += _times_rows(val, _dequantize(w, 0.0, 0.0, WFMT, ASM))
    return w_next, val_next, idx_after, val_after, acc


@triton.jit
def _masked_tile(src, w_ptr, k, ks, row_end, t, cols, word_cols, col_ok, word_ok, N, NW, x, active, w, a, b, acc,
                 WFMT: tl.constexpr, EVEN_N: tl.constexpr, ASM: tl.constexpr, BLOCK_K: tl.constexpr):
    """One step of the masked loop: loads tile k + BLOCK_K's inputs and active rows' weights, then
    adds tile k's products (x, active, w: loaded by the step before) into acc (_acc_zeros' shape)."""
    rows_next = k + BLOCK_K + ks  # [BLOCK_K]
    x_next = tl.load(src + rows_next, mask=rows_next < row_end, other=0.0).to(tl.float32)
    active_next = (tl.abs(x_next) > t) & (rows_next < row_end)
    w_next = _load_weights(w_ptr, rows_next, cols, word_cols, active_next, col_ok, word_ok, N, NW, WFMT, EVEN_N)
    # where, not a multiply by the mask: an inactive inf or NaN must contribute 0.
    xm = tl.where(active, x, 0.0)
    if WFMT == 2:
        # Summed down to the block's columns each tile, so that the accumulator takes no registers
        # from the tile in flight; the group's scale and zero come after (the loop's caller).
        acc += tl.sum(xm[:, None, None, None, None] * _nibbles(w, ASM), axis=0)
    else:
        acc += _times_rows(xm, _dequantize(w, a, b, WFMT, ASM))
    return x_next, active_next, w_next, acc


@triton.jit
def _acc_zeros(BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, WFMT: tl.constexpr):
    """fp32 zeros shaped as the masked loop's accumulator: the tile (a sum down its rows once, after
    the loop), or int4's block of columns in _nibbles' order (summed every tile)."""
    if WFMT == 2:
        acc = tl.zeros([BLOCK_N // 8, 2, 2, 2], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    return acc


@triton.jit
def _acc_sum(acc, BLOCK_N: tl.constexpr, WFMT: tl.constexpr):
    """The masked loop's accumulator -> [1, BLOCK_N] sums, once a program."""
    if WFMT == 2:
        part = acc.reshape(BLOCK_N)[None, :]
    else:
        part = tl.sum(acc, axis=0)[None, :]
    return part


@triton.jit
def _times_rows(x, tile):
    """x [BLOCK_K] times each row of a float or int8 _dequantize tile."""
    return x[:, None] * tile


@triton.jit
def _output(y, res_ptr, offs, ok, y_ptr, HAS_RESIDUAL: tl.constexpr):
    """fp32 sums -> y_ptr's dtype; with a residual, res + y rounded as two dtype tensors add."""
    dtype = y_ptr.dtype.element_ty
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        y = res + y.to(dtype).to(tl.float32)
    return y.to(dtype)


@triton.jit
def _gemv_program(
    pid_n, pid_k, n_programs, split_k,
    x_ptr, w_ptr, s_ptr, z_ptr, t_ptr, y_ptr, partial_ptr, count_ptr, index_ptr, value_ptr, g_ptr, res_ptr, kept_ptr,
    M, K, N, NW, split1, split2, word1, word2, rows_per_split, eps,
    stride_xm, stride_ym, stride_t,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr,
    REDUCE_SPLITS: tl.constexpr, EVEN_N: tl.constexpr, DOT_FP32: tl.constexpr,
    COMPACT: tl.constexpr, COMPACT_BLOCK: tl.constexpr,
    PROLOGUE: tl.constexpr, NORM_BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, COUNT: tl.constexpr,
    WFMT: tl.constexpr, GROUP: tl.constexpr, ASM: tl.constexpr,
):
    """Program (pid_n, pid_k): rows [pid_k * rows_per_split, +rows_per_split) of W's output blocks
    (BLOCKS consecutive ones of a segment, _program_blocks) times the same channels of x's BLOCK_M
    rows (BLOCK_M = 1: FMA on CUDA cores; 16: tl.dot on the union of the rows' active channels).
    W: w_ptr, and for int8 its scales s_ptr [N], for int4 its scales s_ptr and zeros z_ptr
    [K / GROUP, N] (a program's rows are whole groups of GROUP rows); NW: w_ptr's row length (int4:
    int32 words, segment s starting at word (0, word1, word2)[s]; else N).

    What depends on the rows only is made once for all the program's blocks: the compacted list of
    active channels, or the prologue's inputs. BLOCK_M = 1 only: PROLOGUE makes the input from x
    (_load_input), and COUNT adds the number of active channels of each segment into kept_ptr
    (int64 [n_segments]): the program of a segment's first block counts them, its split_k programs
    one range each. Any BLOCK_M: HAS_RESIDUAL returns res + y, y rounded to x's dtype first, as the
    unfused model adds.

    Returns whether this program wrote y's last block (split_k == 1, or the last arriver): the
    persistent decode kernel (persistent.py, BLOCKS = 1) signals the block done then."""
    seg, block0, block_end, seg_start, seg_end, first_block, n_blocks = _program_blocks(pid_n, N, split1, split2, BLOCK_N, BLOCKS)
    t = tl.load(t_ptr + seg * stride_t)
    word0 = tl.where(seg == 0, 0, tl.where(seg == 1, word1, word2))  # int4: the segment's first word
    row_start = pid_k * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, K)
    scratch = (pid_k * n_programs + pid_n) * rows_per_split  # this program's scratch slots
    src = x_ptr  # where the loops read x of row r (at src + r)
    n_slots = 0
    group_tiles = 0  # int4's compact loop: each group's tiles of active rows
    kept = tl.zeros([], dtype=tl.int32)

    if BLOCK_M == 1 and COMPACT:
        # Phase 1: the indices and values of this program's active channels, packed into its
        # scratch slots (one pass: rows_per_split <= COMPACT_BLOCK), so that phase 2 loads full
        # tiles whatever the sparsity and does work only for active rows.
        rows = row_start + tl.arange(0, COMPACT_BLOCK)  # [COMPACT_BLOCK]
        x = _load_input(x_ptr, g_ptr, rows, rows < row_end, K, eps, PROLOGUE, NORM_BLOCK)
        active = (tl.abs(x) > t) & (rows < row_end)
        kept = tl.sum(active.to(tl.int32), axis=0)
        if WFMT == 2:
            # int4: each group's active channels in whole tiles of their own, so that a tile's rows
            # share one group's constants. Group g (of the program's G) starts at tile first[g];
            # the slots after its n[g] channels up to its last tile's end are padding (row -1,
            # value 0). The program spans whole groups, so rows reshape to [G, GROUP].
            G: tl.constexpr = COMPACT_BLOCK // GROUP
            on = active.to(tl.int32).reshape(G, GROUP)
            n = tl.sum(on, axis=1)  # [G]
            tiles = (n + BLOCK_K - 1) // BLOCK_K  # [G]
            first = tl.cumsum(tiles, axis=0) - tiles  # [G]
            slot = scratch + first[:, None] * BLOCK_K + tl.cumsum(on, axis=1) - 1  # [G, GROUP]
            tl.store(index_ptr + slot, rows.reshape(G, GROUP), mask=on > 0)
            tl.store(value_ptr + slot, x.reshape(G, GROUP), mask=on > 0)
            pad = n[:, None] + tl.arange(0, BLOCK_K)[None, :]  # [G, BLOCK_K]: group slots from n[g] on
            pad_ok = pad < tiles[:, None] * BLOCK_K
            pad_slot = scratch + first[:, None] * BLOCK_K + pad
            tl.store(index_ptr + pad_slot, tl.full(pad.shape, -1, tl.int32), mask=pad_ok)
            tl.store(value_ptr + pad_slot, tl.zeros(pad.shape, tl.float32), mask=pad_ok)
            n_slots = tl.sum(tiles, axis=0) * BLOCK_K
            group_tiles = tiles
        else:
            slot = scratch + tl.cumsum(active.to(tl.int32), axis=0) - 1  # [COMPACT_BLOCK]
            tl.store(index_ptr + slot, rows, mask=active)
            tl.store(value_ptr + slot, x, mask=active)
            n_slots = kept
        tl.debug_barrier()  # phase 2's threads read slots that other threads wrote
    elif BLOCK_M == 1 and PROLOGUE != 0:
        # The prologue once for the whole range, into this program's scratch slots: the loop then
        # loads x as it does with no prologue, nothing more on its chain of loads.
        rr = tl.arange(0, COMPACT_BLOCK)  # [COMPACT_BLOCK]
        xr = _load_input(x_ptr, g_ptr, row_start + rr, row_start + rr < row_end, K, eps, PROLOGUE, NORM_BLOCK)
        tl.store(value_ptr + scratch + rr, xr, mask=rr < rows_per_split)
        tl.debug_barrier()  # the loop's threads read slots that other threads wrote
        src = value_ptr + scratch - row_start  # fp32

    # One block: called straight, so that the tuned one-block kernels (and the persistent step's
    # tasks) compile as before, with no loop around their block.
    if BLOCKS == 1:
        wrote = _gemv_block(
            block0, pid_k, split_k, n_blocks, seg, seg_start, seg_end, first_block, word0, t, row_start, row_end,
            scratch, n_slots, group_tiles, src, w_ptr, s_ptr, z_ptr, y_ptr, partial_ptr, count_ptr, index_ptr,
            value_ptr, res_ptr, x_ptr, M, N, NW, stride_xm, stride_ym, BLOCK_M, BLOCK_K, BLOCK_N, REDUCE_SPLITS, EVEN_N,
            DOT_FP32, COMPACT, HAS_RESIDUAL, WFMT, GROUP, ASM)
    else:
        wrote = split_k < 0  # a runtime False, of the type the blocks' answers have
        for block in range(block0, block_end):
            wrote = _gemv_block(
                block, pid_k, split_k, n_blocks, seg, seg_start, seg_end, first_block, word0, t, row_start, row_end,
                scratch, n_slots, group_tiles, src, w_ptr, s_ptr, z_ptr, y_ptr, partial_ptr, count_ptr, index_ptr,
                value_ptr, res_ptr, x_ptr, M, N, NW, stride_xm, stride_ym, BLOCK_M, BLOCK_K, BLOCK_N, REDUCE_SPLITS,
                EVEN_N, DOT_FP32, COMPACT, HAS_RESIDUAL, WFMT, GROUP, ASM)
    if BLOCK_M == 1 and COUNT:
        if block0 == first_block:
            if not COMPACT:
                # After the loop, so that it stays the plain kernel's: under register_cap, a counter
                # there would take the tiles' registers.
                for r0 in range(row_start, row_end, COMPACT_BLOCK):
                    rr = r0 + tl.arange(0, COMPACT_BLOCK)  # [COMPACT_BLOCK]
                    xr = tl.load(src + rr, mask=rr < row_end, other=0.0).to(tl.float32)
                    kept += tl.sum(((tl.abs(xr) > t) & (rr < row_end)).to(tl.int32), axis=0)
            tl.atomic_add(kept_ptr + seg, kept.to(tl.int64))
    return wrote


@triton.jit
def _gemv_block(
    block, pid_k, split_k, n_blocks, seg, seg_start, seg_end, first_block, word0, t, row_start, row_end,
    scratch, n_slots, group_tiles, src, w_ptr, s_ptr, z_ptr, y_ptr, partial_ptr, count_ptr, index_ptr, value_ptr,
    res_ptr, x_ptr, M, N, NW, stride_xm, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, REDUCE_SPLITS: tl.constexpr,
    EVEN_N: tl.constexpr, DOT_FP32: tl.constexpr, COMPACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    WFMT: tl.constexpr, GROUP: tl.constexpr, ASM: tl.constexpr,
):
    """_gemv_program's output block `block` (of n_blocks, in segment seg): its rows' product (the
    compacted list at scratch, n_slots long, int4's in group_tiles tiles a group; or x at src,
    BLOCK_M = 1; or x_ptr's rows), then y's block, directly (split_k == 1) or through the partials,
    summed by the last of its split_k programs to arrive. -> whether this program wrote y's block."""
    col_start = seg_start + (block - first_block) * BLOCK_N
    cols = col_start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    col_ok = cols < seg_end
    # int4: word w of this block holds its columns 8w..8w + 7 (blocks start on a word in a segment).
    local_words = (col_start - seg_start) // 8 + tl.arange(0, BLOCK_N // 8)  # [BLOCK_N // 8]
    word_cols = word0 + local_words
    word_ok = local_words < (seg_end - seg_start + 7) // 8
    cols4 = col_start + tl.arange(0, BLOCK_N).reshape(BLOCK_N // 8, 2, 2, 2)  # int4: as its tiles order columns
    ok4 = cols4 < seg_end
    ms = tl.arange(0, BLOCK_M)  # [BLOCK_M]

    if BLOCK_M == 1 and COMPACT:
        # Phase 2: BLOCK_K slots a tile. Weights run one tile ahead of the sum, indices two, so a
        # tile's rows are in flight while the previous tile is summed.
        ks = tl.arange(0, BLOCK_K)  # [BLOCK_K]
        acc = _acc_zeros(BLOCK_K, BLOCK_N, WFMT)
        idx = tl.load(index_ptr + scratch + ks, mask=ks < n_slots, other=-1)
        val = tl.load(value_ptr + scratch + ks, mask=ks < n_slots, other=0.0)
        w = _load_weights(w_ptr, idx, cols, word_cols, idx >= 0, col_ok, word_ok, N, NW, WFMT, EVEN_N)
        nk = BLOCK_K + ks
        idx_next = tl.load(index_ptr + scratch + nk, mask=nk < n_slots, other=-1)
        val_next = tl.load(value_ptr + scratch + nk, mask=nk < n_slots, other=0.0)
        if WFMT == 2:
            # int4, as the masked loop: group g's tiles (group_tiles[g] of them, after those of the
            # groups before it) summed to sum x (1 + q / 16) and sum x, then its constants applied
            # once. The prefetch runs on across groups.
            gids = tl.arange(0, group_tiles.shape[0])  # the program's groups
            group_first = tl.cumsum(group_tiles, axis=0) - group_tiles
            for g in range(0, tl.cdiv(row_end - row_start, GROUP)):
                first = tl.sum(tl.where(gids == g, group_first, 0), axis=0)
                end = first + tl.sum(tl.where(gids == g, group_tiles, 0), axis=0)
                sums = _acc_zeros(BLOCK_K, BLOCK_N, WFMT)
                xsum = tl.zeros([BLOCK_K], dtype=tl.float32)
                for j in range(first * BLOCK_K, end * BLOCK_K, BLOCK_K):
                    xsum += val
                    w, val, idx_next, val_next, sums = _compact_tile(
                        w_ptr, index_ptr, value_ptr, scratch, j, ks, n_slots, cols, word_cols, col_ok, word_ok, N, NW,
                        w, val, idx_next, val_next, sums, WFMT, EVEN_N, ASM, BLOCK_K)
                a, b = _int4_group(s_ptr, z_ptr, row_start // GROUP + g, cols4, ok4, N)
                acc += a * sums + b * tl.sum(xsum, axis=0)
        else:
            for j in range(0, n_slots, BLOCK_K):
                w, val, idx_next, val_next, acc = _compact_tile(
                    w_ptr, index_ptr, value_ptr, scratch, j, ks, n_slots, cols, word_cols, col_ok, word_ok, N, NW,
                    w, val, idx_next, val_next, acc, WFMT, EVEN_N, ASM, BLOCK_K)
        part = _acc_sum(acc, BLOCK_N, WFMT)  # [1, BLOCK_N]: once a block
    elif BLOCK_M == 1:
        # Weights run one tile ahead of the sum: a tile's active rows are in flight while the
        # previous tile is summed.
        ks = tl.arange(0, BLOCK_K)  # [BLOCK_K]
        acc = _acc_zeros(BLOCK_K, BLOCK_N, WFMT)
        rows = row_start + ks
        x = tl.load(src + rows, mask=rows < row_end, other=0.0).to(tl.float32)
        active = (tl.abs(x) > t) & (rows < row_end)
        w = _load_weights(w_ptr, rows, cols, word_cols, active, col_ok, word_ok, N, NW, WFMT, EVEN_N)
        if WFMT == 2:
            # A group at a time: its tiles' sums of x (1 + q / 16) down to the block's columns, then
            # the group's constants applied once, to them and to the group's sum of x (its inputs
            # loaded again, from L1): sum x (q - zero) scale = a * sum x (1 + q / 16) + b * sum x.
            # The prefetch runs on across groups.
            for g0 in range(row_start, row_end, GROUP):
                sums = _acc_zeros(BLOCK_K, BLOCK_N, WFMT)
                for k in range(g0, tl.minimum(g0 + GROUP, row_end), BLOCK_K):
                    x, active, w, sums = _masked_tile(src, w_ptr, k, ks, row_end, t, cols, word_cols, col_ok, word_ok,
                                                      N, NW, x, active, w, 0.0, 0.0, sums, WFMT, EVEN_N, ASM, BLOCK_K)
                gs = g0 + tl.arange(0, GROUP)  # [GROUP]
                xg = tl.load(src + gs, mask=gs < row_end, other=0.0).to(tl.float32)
                xsum = tl.sum(tl.where((tl.abs(xg) > t) & (gs < row_end), xg, 0.0), axis=0)
                a, b = _int4_group(s_ptr, z_ptr, g0 // GROUP, cols4, ok4, N)
                acc += a * sums + b * xsum
        else:
            for k in range(row_start, row_end, BLOCK_K):
                x, active, w, acc = _masked_tile(src, w_ptr, k, ks, row_end, t, cols, word_cols, col_ok, word_ok,
                                                 N, NW, x, active, w, 0.0, 0.0, acc, WFMT, EVEN_N, ASM, BLOCK_K)
        part = _acc_sum(acc, BLOCK_N, WFMT)  # [1, BLOCK_N]: once a block
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(row_start, row_end, BLOCK_K):
            rows = k + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            x_ok = (ms < M)[:, None] & (rows < row_end)[None, :]  # [BLOCK_M, BLOCK_K]
            x = tl.load(x_ptr + ms[:, None] * stride_xm + rows[None, :], mask=x_ok, other=0.0)
            active = (tl.abs(x.to(tl.float32)) > t) & x_ok
            any_active = tl.max(active.to(tl.int32), axis=0) > 0  # [BLOCK_K]: union over x's rows
            w = _load_weights(w_ptr, rows, cols, word_cols, any_active, col_ok, word_ok, N, NW, WFMT, EVEN_N)
            xm = tl.where(active, x, 0.0)
            if DOT_FP32 or WFMT != 0:
                # fp32 products: fp32 weights and dequantized ones (rounding them to x's dtype would
                # change the weight); the interpreter's tl.dot cannot multiply bf16 (numpy has none).
                if WFMT == 2:
                    a, b = _int4_group(s_ptr, z_ptr, k // GROUP, cols4, ok4, N)  # the tile lies in one group
                else:
                    a, b = 0.0, 0.0
                tile = _dequantize(w, a, b, WFMT, ASM).reshape(BLOCK_K, BLOCK_N)
                acc = tl.dot(xm.to(tl.float32), tile, acc, input_precision="ieee")  # not tf32
            else:
                acc = tl.dot(xm.to(w.dtype), w, acc)
        part = acc  # [BLOCK_M, BLOCK_N]

    if WFMT == 1:
        part *= tl.load(s_ptr + cols, mask=col_ok, other=0.0)[None, :]  # int8: the column's scale, once
    out_offs = ms[:, None] * stride_ym + cols[None, :]  # [BLOCK_M, BLOCK_N]
    out_ok = (ms < M)[:, None] & col_ok[None, :]
    if split_k == 1:
        tl.store(y_ptr + out_offs, _output(part, res_ptr, out_offs, out_ok, y_ptr, HAS_RESIDUAL), mask=out_ok)
        wrote = split_k == 1
    else:
        # Partials: [split_k, n_blocks, BLOCK_M * BLOCK_N] fp32, one dense tile per program.
        tile = ms[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]  # [BLOCK_M, BLOCK_N]
        tl.store(partial_ptr + (pid_k * n_blocks + block) * (BLOCK_M * BLOCK_N) + tile, part)
        # All threads' partial stores happen before the counter moves (barrier, then release);
        # the program that sees split_k - 1 acquires every other program's partial.
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + block, 1, sem="acq_rel", scope="gpu")
        wrote = arrived == split_k - 1
        if wrote:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for r in range(0, split_k, REDUCE_SPLITS):
                rs = r + tl.arange(0, REDUCE_SPLITS)  # [REDUCE_SPLITS]: the splits summed together
                base = (rs * n_blocks + block) * (BLOCK_M * BLOCK_N)
                # .cg: read at L2, where the other SMs' partials are, never a stale L1 line.
                parts = tl.load(partial_ptr + base[:, None, None] + tile[None, :, :],
                                mask=(rs < split_k)[:, None, None], other=0.0,
                                cache_modifier=".cg")  # [REDUCE_SPLITS, BLOCK_M, BLOCK_N]
                total += tl.sum(parts, axis=0)
            tl.store(y_ptr + out_offs, _output(total, res_ptr, out_offs, out_ok, y_ptr, HAS_RESIDUAL), mask=out_ok)
            tl.store(count_ptr + block, 0)  # reset for the next call and for CUDA-graph replays
    return wrote


@triton.jit
def sparse_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, t_ptr, y_ptr, partial_ptr, count_ptr, index_ptr, value_ptr, g_ptr, res_ptr, kept_ptr,
    M, K, N, NW, split1, split2, word1, word2, rows_per_split, eps,
    stride_xm, stride_ym, stride_t,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr,
    REDUCE_SPLITS: tl.constexpr, EVEN_N: tl.constexpr, DOT_FP32: tl.constexpr,
    COMPACT: tl.constexpr, COMPACT_BLOCK: tl.constexpr,
    PROLOGUE: tl.constexpr, NORM_BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, COUNT: tl.constexpr,
    WFMT: tl.constexpr, GROUP: tl.constexpr, ASM: tl.constexpr,
):
    """Program (pid_n, pid_k) of the grid (programs of BLOCKS output blocks, split-K ranges): _gemv_program."""
    _gemv_program(tl.program_id(0), tl.program_id(1), tl.num_programs(0), tl.num_programs(1),
                  x_ptr, w_ptr, s_ptr, z_ptr, t_ptr, y_ptr, partial_ptr, count_ptr, index_ptr, value_ptr, g_ptr, res_ptr,
                  kept_ptr, M, K, N, NW, split1, split2, word1, word2, rows_per_split, eps, stride_xm, stride_ym, stride_t,
                  BLOCK_M, BLOCK_K, BLOCK_N, BLOCKS, REDUCE_SPLITS, EVEN_N, DOT_FP32, COMPACT, COMPACT_BLOCK, PROLOGUE,
                  NORM_BLOCK, HAS_RESIDUAL, COUNT, WFMT, GROUP, ASM)


N_POINTERS = sum(name.endswith("_ptr") for name in sparse_gemv_kernel.arg_names)


def register_cap(n_programs, num_warps, sms):
    """The most registers a thread may take for all n_programs to be resident at once, or None
    where that needs no cap (or cannot be had). The tuned grids are one wave of the plain masked
    loop (128 registers a thread at 4 warps); its fused forms (norm, residual, count) take more,
    one program an SM fewer, and then a second wave of programs. Capped, they fit in 128."""
    per_sm = triton.cdiv(n_programs, sms)
    cap = REGISTERS_PER_SM // (per_sm * 32 * num_warps) // 8 * 8  # allocated 8 a thread at a time
    return cap if 128 <= cap < 255 else None


def weight_format(data, scales, zeros, group_size):
    """-> (WFMT, group size) from the tensors: a float data, int8 with scales, uint8 (int4) with
    scales, zeros and a group size."""
    if data.dtype == torch.int8:
        if scales is None or scales.dtype != torch.float32:
            raise ValueError("int8 weights need fp32 scales [N]")
        return INT8, 1
    if data.dtype == torch.uint8:
        if scales is None or zeros is None or not group_size:
            raise ValueError("int4 weights need scales, zeros and a group size")
        return INT4, group_size
    return FLOAT, 1


def fit(cfg, wfmt, group, K):
    """A config as the weight format takes it. int4: programs of whole groups (rows_per_program a
    multiple of the group) and tiles within one (block_k <= group), so that a tile's rows share
    their per-column constants (the compact loop pads each group's active rows to whole tiles)."""
    if wfmt != INT4:
        return cfg
    rows = max(group, cfg.rows_per_program // group * group)
    return dataclasses.replace(cfg, block_k=min(cfg.block_k, group), rows_per_program=rows)


_plans = {}  # (everything a launch depends on but the tensors' values) -> Plan


def clear_plans():
    """Forget the launch plans (after a change of the config a shape gets)."""
    _plans.clear()


class Plan:
    """One launch shape worked out once: grid, scalars, constexprs, workspace buffers. A repeated
    call with the same shapes only looks it up, so an eager call costs little more than the launch."""

    def __init__(self, x, data, thresholds, splits, cfg, prologue, residual, kept, wfmt, group):
        M = x.shape[0]
        self.K = K = x.shape[1] // 2 if prologue == 2 else x.shape[1]
        self.N = N = sum(splits)
        block_m = 1 if M == 1 else 16  # tl.dot wants at least 16 rows
        cfg = fit(cfg or choose_config(K, splits, ("float", "int8", "int4")[wfmt], gpu_name(x.device), sm_count(x.device)),
                  wfmt, group, K)
        rows = cfg.rows_per_program
        if block_m > 1:
            # Fewer, longer splits: the reduction reads 16 rows of partials per split.
            rows = max(rows, triton.cdiv(triton.cdiv(K, 8), cfg.block_k) * cfg.block_k)
            rows = fit(dataclasses.replace(cfg, rows_per_program=rows), wfmt, group, K).rows_per_program
        if prologue:
            rows = min(rows, COMPACT_BLOCK)  # the prologue runs over a program's rows in one pass
        self.rows = rows
        split_k = triton.cdiv(K, rows)
        n_blocks = sum(triton.cdiv(w, cfg.block_n) for w in splits)
        # A program takes `blocks` consecutive blocks of a segment (_program_blocks).
        blocks = cfg.blocks_per_program
        n_programs = sum(triton.cdiv(triton.cdiv(w, cfg.block_n), blocks) for w in splits)
        bounds = [sum(splits[:i]) for i in range(1, MAX_SEGMENTS)] + [N] * (MAX_SEGMENTS - len(splits))
        starts, total_bytes = segment_bytes(splits)
        word_bounds = [b // 4 for b in starts[1:]] + [total_bytes // 4] * (MAX_SEGMENTS - len(splits))
        self.scalars = (N, total_bytes // 4 if wfmt == INT4 else N, bounds[0], bounds[1], word_bounds[0], word_bounds[1], rows)
        compact = cfg.compact and block_m == 1 and rows <= COMPACT_BLOCK
        # Scratch: compacted channels, or the prologue's inputs; a slot per row a program owns. Sized
        # for whichever form a one-row call takes (rows <= COMPACT_BLOCK there), so that warming up
        # the plain call sizes it for the fused ones too: none may grow it inside a CUDA graph.
        slots = n_blocks * (K + COMPACT_BLOCK) if block_m == 1 else 1
        self.sizes = dict(partials=split_k * n_blocks * block_m * cfg.block_n, counters=n_blocks, index=slots, value=slots)
        self.buffers, self.generation = workspace.get(x.device, **self.sizes), workspace.generation
        self.grid = (n_programs, split_k, 1)  # three long: a compiled kernel's launch takes no shorter grid
        fused = prologue or residual is not None or kept is not None
        # The plain form keeps the registers its config was tuned with (the compact loop needs ~200).
        cap = register_cap(n_programs * split_k, cfg.num_warps, sm_count(x.device)) if x.device.type == "cuda" and fused and not compact else None
        self.meta = dict(
            BLOCK_M=block_m, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, BLOCKS=blocks,
            REDUCE_SPLITS=max(1, 16 // block_m), EVEN_N=all(w % cfg.block_n == 0 for w in splits),
            # fp32 weights need fp32 products; the interpreter's tl.dot cannot multiply bf16 (numpy has none).
            DOT_FP32=data.dtype == torch.float32 or x.device.type == "cpu",
            COMPACT=compact, COMPACT_BLOCK=COMPACT_BLOCK,
            PROLOGUE=prologue, NORM_BLOCK=triton.next_power_of_2(K) if prologue == 1 else 1,
            HAS_RESIDUAL=residual is not None, COUNT=kept is not None, WFMT=wfmt, GROUP=group, ASM=x.device.type == "cuda",
            num_warps=cfg.num_warps, **({} if cap is None else {"maxnreg": cap}))
        # The launch takes the constexprs positionally, after the arguments, in the kernel's order.
        self.constexprs = [self.meta[name] for name in sparse_gemv_kernel.arg_names if name in self.meta]
        self.compiled = {}  # pointer alignments -> the compiled kernel's launcher on self.grid

    def launch(self, args):
        """sparse_gemv_kernel on args. On CUDA straight into the kernel compiled for these pointers'
        alignments (Triton specializes on them; the plan's key fixes every other specialized
        value), past Triton's binding of the arguments, most of an eager call's host time.
        The pointers go as integers: the launcher then skips, for each, a data_ptr() call and a
        driver query of the pointer."""
        if args[0].device.type != "cuda":
            sparse_gemv_kernel[self.grid](*args, **self.meta)
            return
        pointers = [a.data_ptr() for a in args[:N_POINTERS]]  # the pointers come first
        aligned = tuple(p % 16 == 0 for p in pointers)
        run = self.compiled.get(aligned)
        if run is None:
            kernel = sparse_gemv_kernel.warmup(*args, grid=self.grid, **self.meta)
            run = self.compiled[aligned] = kernel[self.grid]
        run(*pointers, *args[N_POINTERS:], *self.constexprs)

    def workspace(self, device):
        if self.generation != workspace.generation:  # another call grew a buffer: take the new ones
            self.buffers, self.generation = workspace.get(device, **self.sizes), workspace.generation
        return self.buffers


def gpu_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def check(x, data, thresholds, splits, norm_weight, swiglu, residual, kept, scales, zeros, group_size):
    """The launcher's argument checks, made once per launch shape (the plan's key holds what they see)."""
    if norm_weight is not None and swiglu:
        raise ValueError("norm_weight and swiglu exclude each other: one prologue a launch")
    prologue = 1 if norm_weight is not None else 2 if swiglu else 0
    wfmt, group = weight_format(data, scales, zeros, group_size)
    M = x.shape[0]
    K = x.shape[1] // 2 if swiglu else x.shape[1]  # the weight's in_features
    N = sum(splits)
    width = segment_bytes(splits)[1] if wfmt == INT4 else N
    if (data.shape != (K, width) or x.shape[1] != (2 * K if swiglu else K) or not data.is_contiguous()
            or x.stride(1) != 1 or (prologue and not x.is_contiguous())):
        raise ValueError(f"x {tuple(x.shape)} (inner stride 1) and a contiguous [K, {width}] weight expected, got {tuple(data.shape)}")
    if wfmt == FLOAT and x.dtype != data.dtype:
        raise ValueError(f"x is {x.dtype}, the weight {data.dtype}: the kernel computes in the weight's dtype")
    if wfmt == INT8 and scales.shape != (N,):
        raise ValueError(f"int8 scales must be [{N}]")
    if wfmt == INT4 and (scales.shape != (triton.cdiv(K, group), N) or zeros.shape != scales.shape or group & (group - 1)):
        raise ValueError(f"int4 scales and zeros must be [{triton.cdiv(K, group)}, {N}], the group size a power of two")
    if not 1 <= M <= MAX_ROWS or not 1 <= len(splits) <= MAX_SEGMENTS:
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
    return prologue, wfmt, group


def gemv_call(x, data, thresholds, splits, config=None, out=None, norm_weight=None, eps=0.0, swiglu=False,
              residual=None, kept=None, scales=None, zeros=None, group_size=0):
    """x: [M, K] (M <= MAX_ROWS); data: the weight [K, N] in a float dtype, or int8 [K, N] with fp32
    scales [N], or int4 (uint8 [K, N bytes] with fp16 scales and uint8 zeros [K / group_size, N]),
    as packed.PackedWeight lays them out; thresholds: fp32 [n_segments] (any stride); splits:
    segment widths summing to N. -> (plan, arguments, y) of sparse_gemv_kernel's launch, y: [M, N]
    in x's dtype (out if given).

    Fused around the product (ops.sparse_linear documents them): norm_weight (the input is
    RMSNorm(x) * norm_weight, eps) or swiglu (x: [1, 2K] = [gate | up], the input is silu(gate) * up),
    and kept (int64 [n_segments], += active channels), for M = 1 only; residual ([M, N]) for any M."""
    key = (x.shape, x.stride(), x.dtype, x.device, data.shape, data.dtype, tuple(splits), config, thresholds.shape,
           thresholds.dtype, None if norm_weight is None else norm_weight.shape, swiglu,
           None if residual is None else (residual.shape, residual.stride(), residual.dtype),
           None if kept is None else (kept.shape, kept.dtype), None if scales is None else (scales.shape, scales.dtype),
           None if zeros is None else zeros.shape, group_size)
    plan = _plans.get(key)
    if plan is None:
        prologue, wfmt, group = check(x, data, thresholds, splits, norm_weight, swiglu, residual, kept, scales, zeros, group_size)
        plan = _plans[key] = Plan(x, data, thresholds, splits, config, prologue, residual, kept, wfmt, group)
    partials, counters, index, value = plan.workspace(x.device)
    y = torch.empty(x.shape[0], plan.N, dtype=x.dtype, device=x.device) if out is None else out
    # Unused pointers get a tensor already at hand: the kernel never reads them.
    args = (x, data, x if scales is None else scales, x if zeros is None else zeros, thresholds, y, partials, counters, index, value,
            x if norm_weight is None else norm_weight, x if residual is None else residual, counters if kept is None else kept,
            x.shape[0], plan.K, *plan.scalars, eps, x.stride(0), y.stride(0), thresholds.stride(0))
    return plan, args, y


def sparse_gemv(*args, **kwargs):
    """gemv_call's arguments; launches the kernel and returns y."""
    plan, kernel_args, y = gemv_call(*args, **kwargs)
    plan.launch(kernel_args)
    return y
