"""Time the sparse GEMV on a GPU: every weight format at Llama shapes against the dense baselines,
the fused decode forms, configs on one shape, tuning, and the host cost of an eager call.

    python -m scripts.benchmark_gemv                          # formats x shapes x sparsities -> gemv_<gpu>.json
    python -m scripts.benchmark_gemv --tune                   # tune first; prints the configs.TUNED entry
    python -m scripts.benchmark_gemv --formats bf16 int8 int4-g128 --models llama-3-8b
    python -m scripts.benchmark_gemv --fused                  # the decode forms against the plain kernel
    python -m scripts.benchmark_gemv --shape 14336:4096 --configs 128x64r1024w4 1024x16r1024w8c
    python -m scripts.benchmark_gemv --eager-host             # host microseconds of one eager call

Timing (sparse_kernels.tuning.time_in_graph): calls replayed from a CUDA graph, as a compiled decode
step runs them, cycling through enough weight copies (4x the L2) that each call reads its weight
cold; medians. Bytes are the ones that must move: the active rows of the weight (int4: and every
group's scales and zeros; int8: the scales), x and y; bandwidth is against a device-to-device copy
measured in the same run. Baselines, dense: cuBLAS on bf16 weights (torch.matmul), gpt-fast's int8
weight-only linear compiled by inductor, torch's tinygemm int4 kernel. Each format's fixed cost a
call is the intercept of a least-squares line of time against bytes over its sparsity sweep.
"""
import argparse
import math
import re
import statistics
import time

import torch
from tqdm import tqdm

from generate import UsageError, cli
from quantize import Int4Linear, Int8Linear
from scripts.common import RESULTS, environment, gpu_tag, save_json
from sparse_kernels import configs, pack_weight, projection_input, sparse_linear, tuning
from sparse_kernels.configs import LLAMA_2_7B, LLAMA_3_8B, LLAMA_70B, Config
from sparse_kernels.gemv import clear_plans, gpu_name

MODELS = {"llama-2-7b": LLAMA_2_7B, "llama-3-8b": LLAMA_3_8B, "llama-70b": LLAMA_70B}
FORMATS = {"bf16": ("bf16", None), "fp16": ("fp16", None), "int8": ("int8", None),
           "int4-g32": ("int4", 32), "int4-g64": ("int4", 64), "int4-g128": ("int4", 128)}
SPARSITIES = [0.0, 0.25, 0.4, 0.5, 0.6, 0.7, 0.9]
CONFIG = re.compile(r"^(\d+)x(\d+)r(\d+)w(\d+)(c?)(?:b(\d+))?$")
FUSED = [("qkv", 4096, (4096, 1024, 1024), "norm", False), ("o", 4096, (4096,), "none", True),
         ("gate_up", 4096, (14336, 14336), "norm", False), ("down", 14336, (4096,), "swiglu", True)]


def parse_config(text):
    """'128x64r1024w4c' -> Config(128, 64, 1024, 4, compact=True): BLOCK_N x BLOCK_K, rows a program,
    warps; a 'b2' suffix: 2 output blocks a program."""
    m = CONFIG.match(text)
    if m is None:
        raise UsageError(f"config {text!r} is not BLOCK_NxBLOCK_KrROWSwWARPS[c][bBLOCKS], e.g. 128x64r1024w4 or 512x16r1024w4cb2")
    block_n, block_k, rows, warps = (int(g) for g in m.groups()[:4])
    if rows % block_k:
        raise UsageError(f"config {text!r}: rows per program must be a multiple of BLOCK_K")
    blocks = int(m.group(6) or 1)
    if blocks < 1:
        raise UsageError(f"config {text!r}: a program takes at least one block")
    return Config(block_n=block_n, block_k=block_k, rows_per_program=rows, num_warps=warps, compact=m.group(5) == "c",
                  blocks_per_program=blocks)


def parse_shape(text):
    """'4096:14336,14336' -> (4096, (14336, 14336)): in_features, then the segments' widths."""
    try:
        k, _, splits = text.partition(":")
        return int(k), tuple(int(s) for s in splits.split(","))
    except ValueError:
        raise UsageError(f"--shape expects IN:OUT[,OUT2[,OUT3]], got {text!r}") from None


def dtype_of(fmt):
    return {"fp16": torch.float16, "fp32": torch.float32}.get(fmt, torch.bfloat16)


def weights(K, splits, fmt, group, device):
    """Enough packed copies of one random weight shape to read each cold (their float originals too)."""
    N = sum(splits)
    Ws = [torch.randn(N, K, device=device) * 0.02]
    first = pack_weight(Ws[0], fmt, splits, group, dtype_of(fmt))
    copies = tuning.weight_copies(weight_bytes(first, K), device)
    Ws += [torch.randn(N, K, device=device) * 0.02 for _ in range(copies - 1)]
    return [first] + [pack_weight(W, fmt, splits, group, dtype_of(fmt)) for W in Ws[1:]]


def weight_bytes(pw, active_rows):
    """Bytes a call must read of pw for active_rows input channels: those rows, plus the scales (and
    zeros) that any active row needs (every int4 group has one active row at these sparsities)."""
    data, scales, zeros, _ = pw.kernel_tensors()
    extra = sum(t.numel() * t.element_size() for t in (scales, zeros) if t is not None)
    return active_rows * data.shape[1] * data.element_size() + extra


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def reference(x, W64, t, splits):
    """float64 per-segment product of the thresholded x; W64: [out, in]."""
    parts, start = [], 0
    for i, w in enumerate(splits):
        xs = torch.where(x.float().abs() > t[i], x.double(), 0.0)
        parts.append(xs @ W64[start:start + w].t())
        start += w
    return torch.cat(parts, dim=-1)


def baselines(K, splits, fmt, pws, x):
    """Dense microseconds of the same shape: cuBLAS on bf16 weights, and the dense quantized kernel
    of fmt where there is one (gpt-fast's int8 linear compiled, tinygemm int4)."""
    xb = x.to(torch.bfloat16)
    out = {"cublas_bf16": tuning.time_in_graph([lambda W=W: torch.matmul(xb, W.t()) for W in map(bf16_linear_weight, pws)])}
    if fmt == "int8":
        mods = [Int8Linear(pw) for pw in pws]
        out["gpt_fast_int8"] = tuning.time_in_graph([lambda m=m: int8_linear(x, m.weight, m.scales) for m in mods])
    if fmt == "int4":
        mods = [Int4Linear(pw) for pw in pws]
        out["tinygemm_int4"] = tuning.time_in_graph([lambda m=m: m(x) for m in mods])
        out["tinygemm_int4_rel_err"] = rel_err(mods[0](x), x.double() @ pws[0].dequantize().double().t())
    return out


def bf16_linear_weight(pw):
    """The weight as nn.Linear holds it in bf16, [out, in]: what cuBLAS multiplies by."""
    return pw.dequantize().to(torch.bfloat16).contiguous()


@torch.compile
def int8_linear(x, weight, scales):
    # Int8Linear's forward on tensors: one graph for every weight copy (inductor fuses the cast).
    return torch.nn.functional.linear(x, weight.to(x.dtype)) * scales


def fixed_cost(rows):
    """Least squares us = a + bytes / b over a sweep -> (a: microseconds a call, b: TB/s)."""
    xs, ys = [r["bytes"] for r in rows], [r["us"] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((v - mx) ** 2 for v in xs)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sxx if sxx else 0.0
    return my - slope * mx, (1e-6 / slope if slope > 0 else math.inf)


def run_shape(name, K, splits, label, copy_bw, device):
    """One shape in one format: every sparsity timed and checked against float64 -> rows, baselines."""
    fmt, group = FORMATS[label]
    pws = weights(K, splits, fmt, group, device)
    x = torch.randn(1, K, device=device, dtype=dtype_of(fmt))
    W64 = pws[0].dequantize().double()
    base = baselines(K, splits, fmt, pws, x)
    rows = []
    for s in SPARSITIES:
        thr = torch.quantile(x.float().abs().flatten(), s).item() if s > 0 else 0.0
        t = torch.full((len(splits),), thr, device=device)
        active = int((x.float().abs() > thr).sum())
        y = sparse_linear(x, pws[0], t)
        us = tuning.time_in_graph([lambda pw=pw: sparse_linear(x, pw, t) for pw in pws])
        needed = weight_bytes(pws[0], active) + (K + sum(splits)) * x.element_size()
        rows.append(dict(shape=name, in_features=K, splits=list(splits), format=label, sparsity=s, zero_fraction=1 - active / K,
                         us=us, bytes=needed, tb_per_s=needed / us * 1e-6, pct_copy_bw=100 * needed / (us * 1e-6) / copy_bw,
                         rel_err=rel_err(y, reference(x, W64, t, splits)),
                         **{f"speedup_vs_{k}": v / us for k, v in base.items() if not k.endswith("err")}))
    intercept, bw = fixed_cost(rows)
    return rows, dict(shape=name, format=label, fixed_us=intercept, fitted_tb_per_s=bw, **base)


def kernel_report():
    """Registers and spills of each compiled kernel variant."""
    from sparse_kernels import gemv

    out = []
    for caches in gemv.sparse_gemv_kernel.device_caches.values():
        for k in caches[0].values():
            out.append({"constants": str(getattr(k.src, "constants", "")), "n_regs": k.n_regs, "n_spills": k.n_spills})
    return out


def table(args, device, copy_bw):
    result = dict(**environment(device, "benchmark_gemv"), copy_tb_per_s=copy_bw / 1e12, rows=[], fits=[], tuned=None)
    shapes = [(f"{m} {p}", *MODELS[m][p]) for m in args.models for p in ("qkv", "o", "gate_up", "down", "gate")]
    if args.tune:
        chosen = {}
        for name, K, splits in tqdm(shapes, desc="tune", unit="shape"):
            for label in args.formats:
                fmt, group = FORMATS[label]
                cfg = tuning.tune(K, splits, fmt, group, device=device)
                tqdm.write(f"tuned {name} {label}: {cfg}")  # shown as it comes: a run cut short keeps its choices
                if fmt in ("int8", "int4"):
                    chosen[(K, splits, fmt)] = cfg
                else:
                    chosen.setdefault((K, splits), cfg)
        command = "python -m scripts.benchmark_gemv --tune " + " ".join(f"--{k} {' '.join(v)}" for k, v in
                                                                       [("models", args.models), ("formats", args.formats)])
        result["tuned"] = configs.format_entry(gpu_name(device), f"{command}, {time.strftime('%Y-%m-%d')}", chosen)
    for name, K, splits in tqdm(shapes, desc="shapes", unit="shape"):
        for label in args.formats:
            rows, fit_row = run_shape(name, K, splits, label, copy_bw, device)
            result["rows"] += rows
            result["fits"].append(fit_row)
            save_json(args.out, result)  # after every shape: an interrupted run keeps what it measured
    result["kernels"] = kernel_report()
    save_json(args.out, result)
    print(f"{result['device_name']}  torch {result['torch']}  triton {result['triton']}  copy {copy_bw / 1e12:.2f} TB/s")
    print("us at each sparsity (speedup vs cuBLAS bf16, % of copy bandwidth on needed bytes); max rel err vs float64")
    for label in args.formats:
        print(f"\n{label:<18}{'cuBLAS':>8}" + "".join(f"{s:>17.0%}" for s in SPARSITIES) + f"{'max err':>9}{'fixed us':>9}{'TB/s':>6}  dense baseline")
        for name, _, _ in shapes:
            rs = [r for r in result["rows"] if r["shape"] == name and r["format"] == label]
            f = next(f for f in result["fits"] if f["shape"] == name and f["format"] == label)
            extra = {k: v for k, v in f.items() if k.startswith(("gpt_fast", "tinygemm")) and not k.endswith("err")}
            print(f"{name:<18}{f['cublas_bf16']:>8.1f}" + "".join(f"{r['us']:>6.1f} ({r['speedup_vs_cublas_bf16']:.2f},{r['pct_copy_bw']:3.0f})" for r in rs)
                  + f"{max(r['rel_err'] for r in rs):>9.1e}{f['fixed_us']:>9.1f}{f['fitted_tb_per_s']:>6.2f}  "
                  + " ".join(f"{k} {v:.1f}" for k, v in extra.items()))
    if result["tuned"]:
        print("\nconfigs.TUNED entry:\n" + result["tuned"])


def fused(args, device):
    """Each projection of a decode step in the form the model gives it: the plain kernel on an input
    made beforehand, the fused call, the fused call that also counts (generate.py's), the unfused ops."""
    result = dict(**environment(device, "benchmark_gemv"), rows=[])
    for label in args.formats:
        fmt, group = FORMATS[label]
        for name, K, splits, form, res in FUSED:
            pws = weights(K, splits, fmt, group, device)
            dtype = dtype_of(fmt)
            x = torch.randn(1, 2 * K if form == "swiglu" else K, device=device, dtype=dtype)
            kw = {"norm": dict(norm_weight=torch.rand(K, device=device, dtype=dtype) + 0.5, norm_eps=1e-5),
                  "swiglu": dict(swiglu=True), "none": {}}[form]
            xin = projection_input(x, **kw)
            r = torch.randn(1, sum(splits), device=device, dtype=dtype) if res else None
            kept = torch.zeros(len(splits), dtype=torch.int64, device=device)
            for s in (0.0, 0.5):
                t = torch.full((len(splits),), torch.quantile(xin.float().abs().flatten(), s).item() if s else 0.0, device=device)
                fns = {"plain": [lambda pw=pw: sparse_linear(xin, pw, t) for pw in pws],
                       "fused": [lambda pw=pw: sparse_linear(x, pw, t, residual=r, **kw) for pw in pws],
                       "fused, counted": [lambda pw=pw: sparse_linear(x, pw, t, residual=r, kept=kept, **kw) for pw in pws],
                       "unfused ops": [lambda pw=pw: (lambda y: y if r is None else r + y)(sparse_linear(projection_input(x, **kw), pw, t))
                                       for pw in pws]}
                times = {k: [] for k in fns}
                for order in (list(fns), list(fns)[::-1]):  # each form twice, in opposite orders
                    for k in order:
                        times[k].append(tuning.time_in_graph(fns[k]))
                result["rows"].append(dict(format=label, shape=name, in_features=K, splits=list(splits), prologue=form, residual=res,
                                           sparsity=s, us=times))
                print(f"{label:9} {name:8} {form:7} res={res:d} s={s:.1f}  " + "  ".join(f"{k} {v[0]:5.1f}/{v[1]:5.1f}" for k, v in times.items()))
                save_json(args.out, result)


def sweep(args, device):
    """Chosen configs on one shape (--shape, --configs): the loop of kernel work (predict, change, measure)."""
    K, splits = parse_shape(args.shape)
    cfgs = [parse_config(c) for c in args.configs]
    result = dict(**environment(device, "benchmark_gemv"), shape=[K, list(splits)], rows=[])
    for label in args.formats:
        fmt, group = FORMATS[label]
        pws = weights(K, splits, fmt, group, device)
        x = torch.randn(1, K, device=device, dtype=dtype_of(fmt))
        W64 = pws[0].dequantize().double()
        xb = x.to(torch.bfloat16)
        dense = tuning.time_in_graph([lambda W=W: torch.matmul(xb, W.t()) for W in map(bf16_linear_weight, pws)])
        for cfg in cfgs:
            for s in (0.0, 0.5):
                t = torch.full((len(splits),), torch.quantile(x.float().abs().flatten(), s).item() if s else 0.0, device=device)
                err = rel_err(tuning.launch(x, pws[0], t, cfg), reference(x, W64, t, splits))
                us = tuning.time_in_graph([lambda pw=pw: tuning.launch(x, pw, t, cfg) for pw in pws])
                result["rows"].append(dict(format=label, config=vars(cfg), sparsity=s, us=us, cublas_bf16_us=dense, rel_err=err))
                print(f"{label:9} {cfg}  s={s:.1f}  {us:6.1f} us (cuBLAS bf16 {dense:.1f}), rel err {err:.1e}")
                save_json(args.out, result)


def eager_host(args, device):
    """Host microseconds of one eager call (no torch.compile), the GPU work being small: the time to
    enqueue 200 calls, over 200, the median of 7 such rounds (the first rounds of a process run
    slower); sparse_linear, its torch custom op (what compile sees), torch.matmul."""
    from sparse_kernels.ops import sparse_linear_op

    result = dict(**environment(device, "benchmark_gemv"), rows=[])
    for label in args.formats:
        fmt, group = FORMATS[label]
        for name, K, splits in [("llama-3-8b o", *LLAMA_3_8B["o"]), ("llama-3-8b qkv", *LLAMA_3_8B["qkv"])]:
            pw = pack_weight(torch.randn(sum(splits), K, device=device) * 0.02, fmt, splits, group, dtype_of(fmt))
            x = torch.randn(1, K, device=device, dtype=dtype_of(fmt))
            t = torch.full((len(splits),), 0.5, device=device)
            data, scales, zeros, gs = pw.kernel_tensors()
            W, xb = bf16_linear_weight(pw), x.to(torch.bfloat16)
            calls = {"sparse_linear": lambda: sparse_linear(x, pw, t),
                     "custom op": lambda: sparse_linear_op(x, data, t, list(splits), None, 0.0, False, None, scales, zeros, gs),
                     "torch.matmul": lambda: torch.matmul(xb, W.t())}
            row = dict(format=label, shape=name)
            for k, fn in calls.items():
                rounds = []
                for _ in range(7):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(200):
                        fn()
                    rounds.append((time.perf_counter() - t0) / 200 * 1e6)
                torch.cuda.synchronize()
                row[k] = statistics.median(rounds)
            result["rows"].append(row)
            print(f"{label:9} {name:15} host us a call: " + "  ".join(f"{k} {row[k]:.1f}" for k in calls))
    save_json(args.out, result)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--formats", nargs="+", default=["bf16", "int8", "int4-g128"], choices=list(FORMATS))
    p.add_argument("--tune", action="store_true", help="tune each shape and format first, and print the configs.TUNED entry")
    p.add_argument("--fused", action="store_true", help="time the fused decode forms instead")
    p.add_argument("--eager-host", action="store_true", help="measure the host time of an eager call instead")
    p.add_argument("--shape", help="with --configs: IN:OUT[,OUT2[,OUT3]], one shape")
    p.add_argument("--configs", nargs="+", help="with --shape: configs BLOCK_NxBLOCK_KrROWSwWARPS[c] to time (a bBLOCKS suffix: blocks a program)")
    p.add_argument("--out", help="JSON file (default benchmarks/results/gemv_<gpu>.json, or gemv_<mode>_<gpu>.json)")
    args = p.parse_args(argv)
    if bool(args.shape) != bool(args.configs):
        raise UsageError("--shape and --configs go together")
    if args.configs:
        parse_shape(args.shape)
        for c in args.configs:
            parse_config(c)
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise UsageError("this benchmark times kernels on a CUDA GPU; none is available")
    device = torch.device("cuda:0")
    torch.manual_seed(0)
    clear_plans()
    mode = "fused" if args.fused else "eager_host" if args.eager_host else "sweep" if args.configs else None
    args.out = args.out or RESULTS / f"gemv_{mode + '_' if mode else ''}{gpu_tag(device)}.json"
    if args.fused:
        fused(args, device)
    elif args.eager_host:
        eager_host(args, device)
    elif args.configs:
        sweep(args, device)
    else:
        table(args, device, tuning.copy_bandwidth(device))


if __name__ == "__main__":
    cli(main)
