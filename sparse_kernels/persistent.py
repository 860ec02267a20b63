"""A decode step's layers in one persistent launch: every layer's qkv, attention, o, gate/up and down
of one token, where the per-projection path launches five kernels a layer.

Work decomposition: the step is a list of tasks in topological order, layer after layer, and in a
layer five phases: qkv's GEMV programs (RMSNorm prologue), attention's (kv head, split) programs,
o's (residual epilogue), gate/up's (RMSNorm prologue), down's (SwiGLU prologue, residual epilogue).
A task is one program of the kernel that phase launches alone (gemv._gemv_program at the same
(output block, split-K range), attention._attention_program at the same (kv head, split)), each
phase's a noinline function (_gemv_task, _attention_task), with the per-projection path's config
where it fits this kernel (phase_config): then the two paths make the same sums in the same order.

Readiness: a done counter per (layer, phase) in global memory. The program that writes a block
of a phase's output (the GEMV's last split-K arriver, attention's combining split) increments it
after a barrier, with release semantics; a task first waits, acquiring, until the counter of the
phase before it (down of the previous layer, for qkv) holds all of that phase's blocks. Phases
wait for the whole phase before them: the two RMSNorms need the whole vector anyway, and so
one phase's buffers and the shared workspace serve the next phase with no hazard.

Scheduling: program p of G runs tasks p, p + G, p + 2G, ... in order. A task waits only on earlier
tasks, so with all G programs resident at once the smallest unfinished task can always run: no
deadlock. G is what fits at once (registers, shared memory and warps of the compiled kernel, times
the SMs), checked by a probe launch in which every program waits for all the others; where the
probe fails the step is not run this way (ops falls back to the per-projection kernels). Waits are
bounded: past max_polls a wait sets the error flag, the task is skipped and the step ends (check()
raises). The interpreter runs programs one after another, so there G = 1: the same code, in order.

The last program to finish resets the done counters, so the next step and CUDA-graph replays start
from zero; pos is read on the device. Imported only when a call runs on Triton, as gemv.py is.
"""
import torch
import triton
import triton.language as tl

from sparse_kernels import attention, gemv
from sparse_kernels.attention import _attention_program
from sparse_kernels.configs import Config, choose_config, default_config
from sparse_kernels.gemv import _gemv_program
from sparse_kernels.workspace import sm_count, workspace

PHASES = 5  # qkv, attention, o, gate_up, down
NUM_WARPS = 4
# The kernel's registers a thread, every phase's: the plain GEMV loop's 128 (gemv.register_cap),
# four programs an SM. Capped so, ptxas spills 8-16 bytes a bf16 GEMV phase, none for int8 and int4,
# none in attention (96 uncapped at head_dim 128); tests/compile_kernels.py prints the counts.
MAX_REGISTERS = 128
# Contracted multiply-adds: the GEMV loops need them (int4's would be bound by issue without);
# attention's own launch turns them off for rope's rounding, so on a GPU its softmax sums (and an
# fp32 cache row) may round 1 ulp apart from that launch's. The interpreter never contracts.
FP_FUSION = True
MAX_POLLS = 1 << 20  # a wait's bound on a GPU, polls 100 ns apart and more: only a bug waits that long
# Per layer, the tensors of the table: each is reached as layer 0's tensor (a kernel argument, so
# typed and specialized on alignment) plus the table's offset, in elements, to this layer's.
WEIGHT_SLOTS = ("attention_norm", "qkv", "qkv_scales", "qkv_zeros", "qkv_t", "o", "o_scales", "o_zeros", "o_t",
                "ffn_norm", "gate_up", "gate_up_scales", "gate_up_zeros", "gate_up_t", "down", "down_scales", "down_zeros", "down_t")
MUTATED_SLOTS = ("k_cache", "v_cache", "qkv_kept", "o_kept", "gate_up_kept", "down_kept")
SLOTS = WEIGHT_SLOTS + MUTATED_SLOTS


@triton.jit
def _at(base, row, SLOT: tl.constexpr):
    """This layer's tensor of SLOT: base (layer 0's) plus row[SLOT] elements. Tensors are 16-byte
    aligned (checked on the host), so the loads stay vectorized."""
    return base + tl.multiple_of(tl.load(row + SLOT), 128 // base.dtype.element_ty.primitive_bitwidth)


@triton.jit
def _wait(flag_ptr, need, err_ptr, max_polls, ASM: tl.constexpr):
    """Spin until *flag_ptr >= need, then acquire what its incrementers released -> whether it got
    there. After max_polls polls, or once another program has failed, give up and set the error flag.
    ASM (CUDA): a 100 ns sleep between polls, which leaves the SM's issue slots to the programs
    beside this one, the producers among them."""
    seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="gpu")
    if seen < need:
        polls = 0
        failed = tl.load(err_ptr, volatile=True)
        while (seen < need) & (failed == 0) & (polls < max_polls):
            if ASM:
                polls = tl.inline_asm_elementwise("nanosleep.u32 100;\n\tmov.u32 $0, $1;", "=r,r", [polls], dtype=tl.int32,
                                                  is_pure=False, pack=1)
            seen = tl.load(flag_ptr, volatile=True)  # plain reads at L2 while waiting, not atomics
            failed = tl.load(err_ptr, volatile=True)
            polls += 1
        if seen < need:
            tl.atomic_xchg(err_ptr, 1, sem="relaxed", scope="gpu")
        seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()  # every thread's loads after the acquire
    return seen >= need


# One phase's task, a function of its own: inlined in the task loop, each phase's loop-invariant
# values were hoisted out of it, all four phases' together (243 registers a thread, or spills at
# MAX_REGISTERS); called, each phase allocates its own, as its own kernel does.
@triton.jit(noinline=True)
def _gemv_task(
    i, row, x_ptr, w_ptr, s_ptr, z_ptr, t_ptr, y_ptr, partial_ptr, count_ptr, index_ptr, value_ptr, g_ptr, res_ptr, kept_ptr,
    K, N, NW, split1, split2, word1, word2, rows_per_split, n_blocks, split_k, eps,
    W_SLOT: tl.constexpr, G_SLOT: tl.constexpr, KEPT_SLOT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    REDUCE_SPLITS: tl.constexpr, EVEN_N: tl.constexpr, COMPACT_BLOCK: tl.constexpr, PROLOGUE: tl.constexpr,
    NORM_BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, COUNT: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr,
    ASM: tl.constexpr,
):
    """Task i of a GEMV phase: program (i % n_blocks, i // n_blocks) of the projection's own launch,
    on this layer's weight (slots W_SLOT and the three after it: scales, zeros, thresholds), norm
    weight (G_SLOT; -1: none) and kept counts (KEPT_SLOT), one row of x."""
    if G_SLOT >= 0:
        g_ptr = _at(g_ptr, row, G_SLOT)
    return _gemv_program(
        i % n_blocks, i // n_blocks, n_blocks, split_k, x_ptr, _at(w_ptr, row, W_SLOT), _at(s_ptr, row, W_SLOT + 1),
        _at(z_ptr, row, W_SLOT + 2), _at(t_ptr, row, W_SLOT + 3), y_ptr, partial_ptr, count_ptr, index_ptr, value_ptr, g_ptr,
        res_ptr, _at(kept_ptr, row, KEPT_SLOT), 1, K, N, NW, split1, split2, word1, word2, rows_per_split, eps, 0, 0, 1,
        1, BLOCK_K, BLOCK_N, 1, REDUCE_SPLITS, EVEN_N, False, False, COMPACT_BLOCK, PROLOGUE, NORM_BLOCK, HAS_RESIDUAL, COUNT,
        WFMT, GROUP, ASM)


@triton.jit(noinline=True)
def _attention_task(
    i, row, qkv_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pos_ptr, y_ptr, partial_ptr, count_ptr,
    S, n_head, n_kv_head, qk_scale, n_bg, n_splits,
    D: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_BLOCK: tl.constexpr, HEADS: tl.constexpr, COMBINE_SPLITS: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Task i of the attention phase: program (i % n_bg, i // n_bg) of decode attention's own launch,
    on this layer's caches (slots 18 and 19)."""
    return _attention_program(
        i % n_bg, i // n_bg, n_bg, n_splits, qkv_ptr, _at(k_cache_ptr, row, 18), _at(v_cache_ptr, row, 19), cos_ptr, sin_ptr,
        pos_ptr, y_ptr, partial_ptr, count_ptr, S, n_head, n_kv_head, qk_scale, D, BLOCK_T, GROUP_BLOCK, HEADS, COMBINE_SPLITS,
        DOT_FP32)


# split_k set to 1 must stay a runtime value: every phase's `wrote` is then of one type. The probe
# launch (probe 1, n_tasks 0) must run the binary the steps run, so neither is specialized on.
@triton.jit(do_not_specialize=["q_sk", "o_sk", "u_sk", "d_sk", "probe", "n_tasks"])
def persistent_decode_kernel(
    table_ptr, sync_ptr, x_ptr, qkv_ptr, attn_ptr, h_ptr, gu_ptr, partial_ptr, count_ptr, index_ptr, value_ptr,
    cos_ptr, sin_ptr, pos_ptr,
    # layer 0's tensors, in SLOTS order
    g1_ptr, qw_ptr, qs_ptr, qz_ptr, qt_ptr, ow_ptr, os_ptr, oz_ptr, ot_ptr,
    g2_ptr, uw_ptr, us_ptr, uz_ptr, ut_ptr, dw_ptr, ds_ptr, dz_ptr, dt_ptr,
    k_cache_ptr, v_cache_ptr, qkept_ptr, okept_ptr, ukept_ptr, dkept_ptr,
    n_tasks, per_layer, start1, start2, start3, start4, n_done, max_polls, probe, eps,
    # each GEMV phase: K, N, NW, split1, split2, word1, word2, rows_per_split, n_blocks, split_k (gemv.Plan's)
    q_K, q_N, q_NW, q_s1, q_s2, q_w1, q_w2, q_rows, q_nb, q_sk,
    o_K, o_N, o_NW, o_s1, o_s2, o_w1, o_w2, o_rows, o_nb, o_sk,
    u_K, u_N, u_NW, u_s1, u_s2, u_w1, u_w2, u_rows, u_nb, u_sk,
    d_K, d_N, d_NW, d_s1, d_s2, d_w1, d_w2, d_rows, d_nb, d_sk,
    # attention: attention_call's
    S, n_head, n_kv_head, qk_scale, n_bg, n_splits,
    Q_BK: tl.constexpr, Q_BN: tl.constexpr, Q_RS: tl.constexpr, Q_EVEN: tl.constexpr, Q_NORM: tl.constexpr,
    O_BK: tl.constexpr, O_BN: tl.constexpr, O_RS: tl.constexpr, O_EVEN: tl.constexpr,
    U_BK: tl.constexpr, U_BN: tl.constexpr, U_RS: tl.constexpr, U_EVEN: tl.constexpr, U_NORM: tl.constexpr,
    D_BK: tl.constexpr, D_BN: tl.constexpr, D_RS: tl.constexpr, D_EVEN: tl.constexpr,
    D: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_BLOCK: tl.constexpr, HEADS: tl.constexpr, COMBINE_SPLITS: tl.constexpr,
    DOT_FP32: tl.constexpr, COMPACT_BLOCK: tl.constexpr, COUNT: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr,
    ASM: tl.constexpr, N_SLOTS: tl.constexpr, PHASES: tl.constexpr, RESET_BLOCK: tl.constexpr,
):
    """Tasks pid, pid + G, ... of n_tasks (G programs): task i is phase p of layer i // per_layer,
    p counting the phase starts start1..start4 at or below i % per_layer. sync_ptr: int32 done
    counters [n_layer, PHASES], then the probe's, the exit count, the error flag. probe: every
    program waits for all G to have started, and nothing else (the residency check)."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    present_ptr = sync_ptr + n_done
    exit_ptr = present_ptr + 1
    err_ptr = present_ptr + 2
    if probe != 0:
        tl.atomic_add(present_ptr, 1, sem="release", scope="gpu")
        _wait(present_ptr, G, err_ptr, max_polls, ASM)
    known = -1  # the last done counter this program saw complete: its next tasks of the phase need no wait
    for task in range(pid, n_tasks, G):
        layer = task // per_layer
        r = task - layer * per_layer
        phase = (r >= start1).to(tl.int32) + (r >= start2).to(tl.int32) + (r >= start3).to(tl.int32) + (r >= start4).to(tl.int32)
        # The phase before: its done counter and its block count (none before layer 0's qkv).
        before = layer * PHASES + phase - 1
        ready = (before < 0) | (before == known)
        if ready == 0:
            need = tl.where(phase == 0, d_nb, tl.where(phase == 1, q_nb, tl.where(phase == 2, n_bg, tl.where(phase == 3, o_nb, u_nb))))
            ready = _wait(sync_ptr + before, need, err_ptr, max_polls, ASM)
            known = tl.where(ready, before, known)
        if ready:
            row = table_ptr + layer * N_SLOTS
            if phase == 0:  # qkv(RMSNorm(x) * g1)
                wrote = _gemv_task(
                    r, row, x_ptr, qw_ptr, qs_ptr, qz_ptr, qt_ptr, qkv_ptr, partial_ptr, count_ptr, index_ptr, value_ptr,
                    g1_ptr, x_ptr, qkept_ptr, q_K, q_N, q_NW, q_s1, q_s2, q_w1, q_w2, q_rows, q_nb, q_sk, eps,
                    1, 0, 20, Q_BK, Q_BN, Q_RS, Q_EVEN, COMPACT_BLOCK, 1, Q_NORM, False, COUNT, WFMT, GROUP, ASM)
            elif phase == 1:  # attention: rope, the cache write, attention over 0..pos
                wrote = _attention_task(
                    r - start1, row, qkv_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pos_ptr, attn_ptr, partial_ptr,
                    count_ptr, S, n_head, n_kv_head, qk_scale, n_bg, n_splits, D, BLOCK_T, GROUP_BLOCK, HEADS, COMBINE_SPLITS,
                    DOT_FP32)
            elif phase == 2:  # h = x + o(attention)
                wrote = _gemv_task(
                    r - start2, row, attn_ptr, ow_ptr, os_ptr, oz_ptr, ot_ptr, h_ptr, partial_ptr, count_ptr, index_ptr, value_ptr,
                    x_ptr, x_ptr, okept_ptr, o_K, o_N, o_NW, o_s1, o_s2, o_w1, o_w2, o_rows, o_nb, o_sk, eps,
                    5, -1, 21, O_BK, O_BN, O_RS, O_EVEN, COMPACT_BLOCK, 0, 1, True, COUNT, WFMT, GROUP, ASM)
            elif phase == 3:  # [gate | up](RMSNorm(h) * g2)
                wrote = _gemv_task(
                    r - start3, row, h_ptr, uw_ptr, us_ptr, uz_ptr, ut_ptr, gu_ptr, partial_ptr, count_ptr, index_ptr, value_ptr,
                    g2_ptr, h_ptr, ukept_ptr, u_K, u_N, u_NW, u_s1, u_s2, u_w1, u_w2, u_rows, u_nb, u_sk, eps,
                    10, 9, 22, U_BK, U_BN, U_RS, U_EVEN, COMPACT_BLOCK, 1, U_NORM, False, COUNT, WFMT, GROUP, ASM)
            else:  # x = h + down(silu(gate) * up), in place: x's readers of this layer are done
                wrote = _gemv_task(
                    r - start4, row, gu_ptr, dw_ptr, ds_ptr, dz_ptr, dt_ptr, x_ptr, partial_ptr, count_ptr, index_ptr, value_ptr,
                    gu_ptr, h_ptr, dkept_ptr, d_K, d_N, d_NW, d_s1, d_s2, d_w1, d_w2, d_rows, d_nb, d_sk, eps,
                    14, -1, 23, D_BK, D_BN, D_RS, D_EVEN, COMPACT_BLOCK, 2, 1, True, COUNT, WFMT, GROUP, ASM)
            if wrote:
                # Every thread's stores of the block happen before the counter moves (barrier, then release).
                tl.debug_barrier()
                tl.atomic_add(sync_ptr + layer * PHASES + phase, 1, sem="release", scope="gpu")
    # The last program out resets the counters (nothing waits on them any more): the next step,
    # or a CUDA graph's replay, starts from zero. The error flag stays for check().
    tl.debug_barrier()
    gone = tl.atomic_add(exit_ptr, 1, sem="acq_rel", scope="gpu")
    if gone == G - 1:
        for i in range(0, n_done + 2, RESET_BLOCK):
            offs = i + tl.arange(0, RESET_BLOCK)
            tl.store(sync_ptr + offs, tl.zeros([RESET_BLOCK], dtype=tl.int32), mask=offs < n_done + 2)


class Unavailable(Exception):
    """The persistent step cannot run here (why, in a sentence): use the per-projection kernels."""


def phase_config(K, splits, wfmt, device):
    """A GEMV phase's config: the per-projection path's where it fits the kernel (NUM_WARPS warps,
    the masked loop: the compact one takes ~200 registers, every phase's), else the heuristic's."""
    cfg = choose_config(K, splits, ("float", "int8", "int4")[wfmt], gemv.gpu_name(device), sm_count(device))
    if cfg.num_warps != NUM_WARPS or cfg.compact:
        cfg = default_config(K, splits, sm_count(device))
    return Config(cfg.block_n, cfg.block_k, cfg.rows_per_program, NUM_WARPS, False)


def resident_programs(kernel, device):
    """Programs of the compiled kernel that fit on the device at once: the least of its warps',
    registers' (8 a thread at a time) and shared memory's limits an SM, times the SMs."""
    props = torch.cuda.get_device_properties(device)
    threads = 32 * NUM_WARPS
    by_warps = getattr(props, "max_threads_per_multi_processor", 2048) // threads
    by_registers = getattr(props, "regs_per_multiprocessor", 65536) // (triton.cdiv(kernel.n_regs, 8) * 8 * threads)
    shared = kernel.metadata.shared
    # 1 KiB a program is the driver's own (sm_80 on).
    by_shared = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024) // (shared + 1024)
    return min(by_warps, by_registers, by_shared, 32) * props.multi_processor_count


class Step:
    """One model's persistent decode step, worked out once from its tensors: the offsets table, the
    activations' buffers, each phase's launch shape, the grid. Built before CUDA-graph capture (it
    allocates and, on a GPU, compiles and probes): sparse_kernels.warm_up_decode_layers."""

    def __init__(self, x, pos, cos, sin, weights, mutated, splits, n_head, n_kv_head, eps, group_size):
        n_w, n_m = len(WEIGHT_SLOTS), len(MUTATED_SLOTS)
        n_layer = len(weights) // n_w
        if n_layer < 1 or len(weights) != n_layer * n_w or len(mutated) != n_layer * n_m or len(splits) != 7:
            raise ValueError(f"{len(weights)} weights and {len(mutated)} mutated tensors are not {n_w} and {n_m} a layer, "
                             f"or splits {splits} not the 7 segment widths q, k, v, o, gate, up, down")
        layers = [weights[i * n_w:(i + 1) * n_w] + mutated[i * n_m:(i + 1) * n_m] for i in range(n_layer)]
        first = dict(zip(SLOTS, layers[0]))
        device, dtype = x.device, x.dtype
        self.device = device
        dim = x.shape[-1]
        qkv_w, gu_w = sum(splits[:3]), sum(splits[4:6])
        D = first["k_cache"].shape[-1]
        self.buffers = [torch.empty(1, n, dtype=dtype, device=device) for n in (qkv_w, n_head * D, dim, gu_w)]
        qkv, attn, h, gu = self.buffers

        def phase(name, x_in, y, seg, **kw):
            data = first[name]
            wfmt, _ = gemv.weight_format(data, first[f"{name}_scales"], first[f"{name}_zeros"], group_size)
            scales = first[f"{name}_scales"] if wfmt != gemv.FLOAT else None
            zeros = first[f"{name}_zeros"] if wfmt == gemv.INT4 else None
            K = data.shape[0]
            plan, _, _ = gemv.gemv_call(x_in, data, first[f"{name}_t"], seg, config=phase_config(K, seg, wfmt, device), out=y,
                                        eps=eps, kept=first[f"{name}_kept"], scales=scales, zeros=zeros, group_size=group_size, **kw)
            return plan, wfmt

        stream = x.view(1, dim)
        plans = [phase("qkv", stream, qkv, splits[:3], norm_weight=first["attention_norm"]),
                 phase("o", attn, h, splits[3:4], residual=stream),
                 phase("gate_up", h, gu, splits[4:6], norm_weight=first["ffn_norm"]),
                 phase("down", gu, stream, splits[6:7], swiglu=True, residual=h)]
        (qp, wfmt), (op, _), (up, _), (dp, _) = plans
        grid, att_args, att_meta, _ = attention.attention_call(qkv, first["k_cache"], first["v_cache"], cos, sin, pos, n_head,
                                                               n_kv_head, out=attn)
        n_bg, n_splits = grid
        sizes = attention.attention_workspace_sizes(1, n_head, first["k_cache"].shape[2], D, device, n_kv_head)
        for p, _ in plans:
            sizes = {k: max(sizes.get(k, 0), v) for k, v in p.sizes.items()}
        partials, counters, index, value = workspace.get(device, **sizes)
        counts = [qp.grid[0] * qp.grid[1], n_bg * n_splits] + [p.grid[0] * p.grid[1] for p in (op, up, dp)]  # tasks a phase
        starts = [sum(counts[:i]) for i in range(1, PHASES)]
        self.n_done = n_layer * PHASES
        # done counters, the probe's count, the exit count, the error flag
        self.sync = torch.zeros(self.n_done + 3, dtype=torch.int32, device=device)
        self.table = torch.tensor([self.offsets(layers, slot) for slot in range(len(SLOTS))], dtype=torch.int64).t().contiguous().to(device)

        def gemv_args(prefix, p):
            N, NW, s1, s2, w1, w2, rows = p.scalars
            return {f"{prefix}_{k}": v for k, v in zip(("K", "N", "NW", "s1", "s2", "w1", "w2", "rows", "nb", "sk"),
                                                       (p.K, N, NW, s1, s2, w1, w2, rows, p.grid[0], p.grid[1]))}

        def gemv_meta(prefix, p, norm):
            m = p.meta
            out = {f"{prefix}_BK": m["BLOCK_K"], f"{prefix}_BN": m["BLOCK_N"], f"{prefix}_RS": m["REDUCE_SPLITS"], f"{prefix}_EVEN": m["EVEN_N"]}
            return {**out, f"{prefix}_NORM": m["NORM_BLOCK"]} if norm else out

        S, _, _, qk_scale = att_args[9:13]
        self.args = dict(
            table_ptr=self.table, sync_ptr=self.sync, qkv_ptr=qkv, attn_ptr=attn, h_ptr=h, gu_ptr=gu, partial_ptr=partials,
            count_ptr=counters, index_ptr=index, value_ptr=value, cos_ptr=cos, sin_ptr=sin,
            **{name: first[slot] for name, slot in zip(POINTER_ARGS, SLOTS)},
            n_tasks=n_layer * sum(counts), per_layer=sum(counts), start1=starts[0], start2=starts[1], start3=starts[2],
            start4=starts[3], n_done=self.n_done, max_polls=MAX_POLLS if device.type == "cuda" else INTERPRETER_POLLS, probe=0,
            eps=eps, **gemv_args("q", qp), **gemv_args("o", op), **gemv_args("u", up), **gemv_args("d", dp),
            S=S, n_head=n_head, n_kv_head=n_kv_head, qk_scale=qk_scale, n_bg=n_bg, n_splits=n_splits)
        self.meta = dict(
            **gemv_meta("Q", qp, True), **gemv_meta("O", op, False), **gemv_meta("U", up, True), **gemv_meta("D", dp, False),
            **{k: att_meta[k] for k in ("D", "BLOCK_T", "GROUP_BLOCK", "HEADS", "COMBINE_SPLITS", "DOT_FP32")},
            COMPACT_BLOCK=gemv.COMPACT_BLOCK, WFMT=wfmt, GROUP=qp.meta["GROUP"], ASM=device.type == "cuda", N_SLOTS=len(SLOTS), PHASES=PHASES, RESET_BLOCK=256,
            num_warps=NUM_WARPS, num_stages=attention.NUM_STAGES, enable_fp_fusion=FP_FUSION,
            **({"maxnreg": MAX_REGISTERS} if device.type == "cuda" else {}))
        self.grids = {}  # COUNT -> programs

    def offsets(self, layers, slot):
        """Each layer's tensor of slot, in elements from layer 0's; all of one shape and dtype, and
        16-byte aligned on a GPU (the kernel's loads assume it)."""
        base = layers[0][slot]
        out = []
        for layer in layers:
            t = layer[slot]
            gap = t.data_ptr() - base.data_ptr()
            if t.shape != base.shape or t.dtype != base.dtype or t.device != base.device or not t.is_contiguous() \
                    or gap % t.element_size():
                raise Unavailable(f"layer tensors of {SLOTS[slot]} differ in shape, dtype or layout")
            if t.device.type == "cuda" and (gap % 16 or base.data_ptr() % 16):
                raise Unavailable(f"{SLOTS[slot]} is not 16-byte aligned in every layer")
            out.append(gap // t.element_size())
        return out

    def programs(self, count):
        """The grid for COUNT = count: one program on the interpreter (it runs them one after
        another); on a GPU every program the compiled kernel can keep resident, which a probe
        launch confirms (outside CUDA-graph capture, which cannot synchronize)."""
        if count not in self.grids:
            if self.device.type != "cuda":
                self.grids[count] = 1
            else:
                kernel = persistent_decode_kernel.warmup(**self.args, x_ptr=self.buffers[2], pos_ptr=self.table,
                                                         grid=(1,), COUNT=count, **self.meta)
                kernel._init_handles()
                G = resident_programs(kernel, self.device)
                if G < 1:
                    raise Unavailable(f"one program ({kernel.n_regs} registers, {kernel.metadata.shared} bytes of shared memory) does not fit an SM")
                if not torch.cuda.is_current_stream_capturing():
                    probe = dict(self.args, x_ptr=self.buffers[2], pos_ptr=self.table, n_tasks=0, probe=1)
                    persistent_decode_kernel[(G,)](**probe, COUNT=count, **self.meta)
                    failed = int(self.sync[-1])
                    if failed:
                        self.sync[-1] = 0
                        raise Unavailable(f"{G} programs are not resident at once (another process holding SMs?)")
                self.grids[count] = G
        return self.grids[count]

    def __call__(self, x, pos, count):
        out = x.reshape(1, -1).clone()  # the residual stream, updated in place layer after layer
        G = self.programs(count)
        persistent_decode_kernel[(G,)](**self.args, x_ptr=out, pos_ptr=pos, COUNT=count, **self.meta)
        return out.view(x.shape)

    def failed(self):
        """Whether a wait of a step since the last check timed out (a device read: syncs); clears it."""
        failed = int(self.sync[-1]) != 0
        self.sync[-1] = 0
        return failed


POINTER_ARGS = ("g1_ptr", "qw_ptr", "qs_ptr", "qz_ptr", "qt_ptr", "ow_ptr", "os_ptr", "oz_ptr", "ot_ptr", "g2_ptr", "uw_ptr", "us_ptr",
                "uz_ptr", "ut_ptr", "dw_ptr", "ds_ptr", "dz_ptr", "dt_ptr", "k_cache_ptr", "v_cache_ptr", "qkept_ptr", "okept_ptr",
                "ukept_ptr", "dkept_ptr")
INTERPRETER_POLLS = 8  # one program there: a wait that is not met at once never will be

_steps = {}  # (the tensors' addresses, shapes, settings) -> Step


def step_for(x, pos, cos, sin, weights, mutated, splits, n_head, n_kv_head, eps, group_size):
    """The Step of these tensors (built on first sight), or Unavailable."""
    key = (x.shape, x.dtype, x.device, cos.data_ptr(), sin.data_ptr(), tuple(splits), n_head, n_kv_head, eps, group_size,
           tuple((t.data_ptr(), t.shape, t.dtype) for t in weights + mutated))
    step = _steps.get(key)
    if step is None:
        step = _steps[key] = Step(x, pos, cos, sin, weights, mutated, splits, n_head, n_kv_head, eps, group_size)
    return step


def decode_layers(x, pos, cos, sin, weights, mutated, splits, n_head, n_kv_head, eps, group_size, count):
    """ops.decode_layers' launch: -> the residual stream after every layer, [1, 1, dim]."""
    return step_for(x, pos, cos, sin, weights, mutated, splits, n_head, n_kv_head, eps, group_size)(x, pos, count)


def prepare(x, pos, cos, sin, weights, mutated, splits, n_head, n_kv_head, eps, group_size):
    """Build (compile, probe) the step of these tensors ahead of capture -> None, or why it cannot
    run here."""
    try:
        step_for(x, pos, cos, sin, weights, mutated, splits, n_head, n_kv_head, eps, group_size).programs(False)
    except Unavailable as e:
        return str(e)
    return None


def check():
    """Raise if a wait of any persistent step timed out since the last check (syncs the device)."""
    for step in list(_steps.values()):
        if step.failed():
            raise RuntimeError("a persistent decode step gave up waiting for its inputs (a bug, or programs that were not "
                               "resident): its output is wrong")
