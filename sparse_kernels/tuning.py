"""Timing and tuning of the sparse GEMV on a GPU, apart from the kernel: what the benchmarks and
`python -m scripts.benchmark_gemv --tune` use. Nothing here runs in a decode step."""
import dataclasses

import torch
import triton

from sparse_kernels import configs
from sparse_kernels.configs import Config
from sparse_kernels.gemv import FLOAT, INT4, INT8, clear_plans, fit, gpu_name, sparse_gemv
from sparse_kernels.packed import pack_weight

# Candidates that tune() measures: (block_n, block_k, num_warps) tiles of 16 or 32 KB of bf16, 64 fp32
# accumulators a thread, times rows per program, times the two loops.
TILES = [(256, 32, 4), (256, 64, 8), (128, 64, 4), (512, 32, 8), (512, 16, 4), (1024, 16, 8)]
ROWS_PER_PROGRAM = [128, 256, 512, 1024]
# int4's masked loop sums each tile down to the block's columns, so its registers go to the words
# in flight: it also tries taller tiles and programs of one and two warps (one warp sums in
# registers and shuffles only).
INT4_TILES = [(128, 64, 1), (256, 32, 1), (128, 32, 1), (64, 64, 1), (128, 128, 1), (128, 64, 2), (256, 64, 2),
              (256, 32, 2), (512, 32, 4), (128, 16, 1)]
CANDIDATES = [Config(block_n=n, block_k=k, rows_per_program=r, num_warps=w, compact=c)
              for n, k, w in TILES for r in ROWS_PER_PROGRAM for c in (True, False)]
# int4's compact loop from 256 rows on: a shorter program's list of active rows has too few whole
# tiles of a group to save any.
INT4_CANDIDATES = [c for c in CANDIDATES + [Config(block_n=n, block_k=k, rows_per_program=r, num_warps=w, compact=cp)
                                            for n, k, w in INT4_TILES for r in ROWS_PER_PROGRAM for cp in (True, False)]
                   if not (c.compact and c.rows_per_program < 256)]
# Programs of several output blocks, for the long projections (70B's): the compact loop's list made
# once for 2 or 4 blocks, and a grid of fewer, longer programs.
CANDIDATES += [dataclasses.replace(c, blocks_per_program=b) for c in CANDIDATES if c.compact and c.rows_per_program == 1024
               for b in (2, 4)]
INT4_CANDIDATES += [dataclasses.replace(c, blocks_per_program=b) for c in INT4_CANDIDATES
                    if c.compact and c.rows_per_program == 1024 and c.blocks_per_program == 1 for b in (2, 4)]
tune_log = []  # every (key, config, microseconds) tune() measured, for the benchmark's record


def weight_copies(nbytes, device):
    """How many copies of a weight of nbytes make 4x the L2: cycling through them, each call finds
    its weight cold, as each layer's projection does in a decode step."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(2, triton.cdiv(4 * l2, nbytes))


def copy_bandwidth(device="cuda"):
    """Bytes read + written per second by a 1 GiB device-to-device copy (median of 20, CUDA events):
    the practical roofline of a memory-bound kernel."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(20)]
    for start, end in events:
        start.record()
        dst.copy_(src)
        end.record()
    torch.cuda.synchronize()
    seconds = sorted(s.elapsed_time(e) for s, e in events)[len(events) // 2] / 1e3
    return 2 * src.numel() / seconds


def time_in_graph(fns, flush_l2=False, replays=50):
    """Median microseconds per call of fns, run back to back from one CUDA graph as a compiled
    decode step runs them (eagerly, Python costs more than a small GEMV takes on the GPU).

    Give fns that read enough distinct weights (weight_copies) to find them cold. flush_l2=True
    times as triton's do_bench does, zeroing 256 MB before each replay: that leaves the L2 full of
    dirty lines, and the timed calls pay for writing them back, a cost a decode step, whose L2 holds
    the previous layer's clean weights, does not have.
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


def tune(K, splits, fmt="bf16", group_size=None, rows=1, device="cuda", sparsities=(0.0, 0.5), candidates=None):
    """Time the candidate configs on random data at the given sparsities; keep the one with the
    least summed time for this (GPU, K, splits, format) in this process (configs.chosen_here).
    Returns it. Never call during CUDA-graph capture: it allocates and synchronizes.
    """
    device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0"
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("tune() cannot run during CUDA-graph capture; tune before capturing")
    N = sum(splits)
    dtype = torch.bfloat16 if fmt in ("int8", "int4") else {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[fmt]
    first = pack_weight(torch.randn(N, K, device=device) * 0.02, fmt, splits, group_size, dtype)
    nbytes = sum(t.numel() * t.element_size() for t in first.kernel_tensors()[:3] if t is not None)
    pws = [first] + [pack_weight(torch.randn(N, K, device=device) * 0.02, fmt, splits, group_size, dtype)
                     for _ in range(weight_copies(nbytes, device) - 1)]
    x = torch.randn(rows, K, device=device, dtype=dtype)
    best, best_time = None, float("inf")
    # As the launcher fits them to the format (int4: a program a group), without repeats.
    wfmt = {"int8": INT8, "int4": INT4}.get(fmt, FLOAT)
    fitted = dict.fromkeys(fit(c, wfmt, group_size, K) for c in candidates or (INT4_CANDIDATES if fmt == "int4" else CANDIDATES))
    for cfg in fitted:
        times = []
        for s in sparsities:
            t = torch.full((len(splits),), torch.quantile(x.float().abs().flatten(), s).item() if s > 0 else 0.0, device=device)
            times.append(time_in_graph([lambda pw=pw: launch(x, pw, t, cfg) for pw in pws]))
        tune_log.append(((K, tuple(splits), fmt, rows), cfg, times))
        if sum(times) < best_time:
            best, best_time = cfg, sum(times)
    configs.chosen_here[(gpu_name(device), K, tuple(splits), fmt if fmt in ("int8", "int4") else "float")] = best
    clear_plans()
    return best


def launch(x, pw, thresholds, config, **fused):
    """sparse_gemv on a PackedWeight with an explicit config (None: the table's)."""
    data, scales, zeros, group_size = pw.kernel_tensors()
    return sparse_gemv(x, data, thresholds, pw.splits, config, scales=scales, zeros=zeros, group_size=group_size, **fused)
