"""Check the sparse GEMV on CUDA, then time it against cuBLAS on Llama projection shapes.

    python -m scripts.benchmark_gemv              # check, tune, benchmark; JSON + PNG to benchmarks/results/
    python -m scripts.benchmark_gemv --no-tune    # use the shipped config table (sparse_kernels/gemv.py TUNED)

Timing (sparse_kernels.gemv.time_in_graph): calls replayed from a CUDA graph, as a compiled decode
step runs them, cycling through enough weight copies (4x the L2) that each call reads its weight
cold, medians. The "flush" figures time one call the way triton's do_bench does (256 MB zeroed
before each replay), as ../shared/ANCHORS.md did; that adds the write-back of a dirty L2 to every
call, cuBLAS's included. Bandwidth counts the bytes that must move: active weight rows, x and y.
"""
import argparse
import json
import math
import os
import platform
import re
import sys
import traceback
import time

import torch
import triton
from tqdm import tqdm

from sparse_kernels import pack_weight, projection_input, sparse_linear, warm_up
from sparse_kernels import gemv
from sparse_kernels.reference import count_kept

MODELS = {  # dim, q width, k/v width, intermediate size
    "llama-2-7b": (4096, 4096, 4096, 11008),
    "llama-3-8b": (4096, 4096, 1024, 14336),
    "llama-70b": (8192, 8192, 1024, 28672),
}
SPARSITIES = [0.0, 0.25, 0.4, 0.5, 0.6, 0.7, 0.9]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def shapes(models):
    """(name, in_features, splits) for each projection; gate alone is what TEAL's figures time."""
    out = []
    for m in models:
        dim, q, kv, inter = MODELS[m]
        out += [(f"{m} qkv", dim, (q, kv, kv)), (f"{m} o", q, (dim,)), (f"{m} gate_up", dim, (inter, inter)),
                (f"{m} down", inter, (dim,)), (f"{m} gate", dim, (inter,))]
    return out




def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def reference(x, W64, t, splits):
    """float64 per-segment product of the thresholded x; W64: [in, out]."""
    parts, start = [], 0
    for i, w in enumerate(splits):
        xs = torch.where(x.float().abs() > t[i], x.double(), 0.0)
        parts.append(xs @ W64[:, start:start + w])
        start += w
    return torch.cat(parts, dim=-1)


def copy_bandwidth():
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median") * 1e3
    return 2 * src.numel() / (us * 1e-6)  # bytes read + written per s


def check():
    """Correctness on CUDA: odd sizes, segments, rows, poisoned outputs, determinism, CUDA graphs,
    torch.compile(reduce-overhead). Returns a dict of what was checked and the worst errors."""
    torch.manual_seed(0)
    worst = {}
    for fmt, dtype in [("fp32", torch.float32), *DTYPES.items()]:
        for in_f, splits in [(1, (7,)), (257, (100,)), (1000, (1000,)), (4099, (300, 77, 77)), (777, (513, 513)), (4096, (4096, 1024, 1024))]:
            W = torch.randn(sum(splits), in_f, device="cuda", dtype=dtype)
            pw = pack_weight(W, fmt, splits)
            W64 = W.t().double()
            for rows in [1, 3, 16, 17, 40]:
                x = torch.randn(rows, in_f, device="cuda", dtype=dtype)
                absx = x.float().abs().flatten()
                for t in ([0.0] * 3, [torch.quantile(absx, 0.5).item(), math.inf, -1.0], [torch.quantile(absx, 0.9).item(), 0.3, 0.0]):
                    t = torch.tensor(t[:len(splits)], device="cuda")
                    ref = reference(x, W64, t, splits)
                    if rows <= gemv.MAX_ROWS:
                        partials, _, index, value = gemv.workspace.get(x.device, partials=1, counters=1, index=1, value=1)
                        partials.fill_(math.nan)
                        value.fill_(math.nan)
                        index.fill_(0)
                        y = gemv.sparse_gemv(x, pw.data, t, splits, out=torch.full((rows, sum(splits)), math.nan, device="cuda", dtype=dtype))
                    else:
                        y = sparse_linear(x, pw, t)
                    assert torch.isfinite(y).all(), (fmt, in_f, splits, rows)
                    err = rel_err(y, ref) if ref.norm() > 0 else float((y != 0).any())
                    worst[fmt] = max(worst.get(fmt, 0.0), err)
                    assert err < (1e-5 if fmt == "fp32" else 1e-2), (fmt, in_f, splits, rows, err)
    assert (gemv.workspace.get(torch.device("cuda"), counters=1)[0] == 0).all()

    # Fused decode forms (norm or SwiGLU prologue, residual, kept count) against the float64
    # product of the input torch makes, in bf16 (the GPU rounds to nearest, as torch does).
    for in_f, splits, form in [(4096, (4096, 1024, 1024), "norm"), (14336, (4096,), "swiglu"), (777, (300, 77, 77), "norm"),
                               (1000, (513,), "swiglu"), (4096, (4096,), "none"), (4096, (14336, 14336), "norm")]:
        W = torch.randn(sum(splits), in_f, device="cuda", dtype=torch.bfloat16) * 0.02
        pw = pack_weight(W, "bf16", splits)
        x = torch.randn(1, 2 * in_f if form == "swiglu" else in_f, device="cuda", dtype=torch.bfloat16)
        kwargs = {"norm": dict(norm_weight=torch.rand(in_f, device="cuda", dtype=torch.bfloat16) + 0.5, norm_eps=1e-5),
                  "swiglu": dict(swiglu=True), "none": {}}[form]
        xin = projection_input(x, **kwargs)
        t = torch.quantile(xin.float().abs().flatten(), torch.tensor([0.3, 0.5, 0.7], device="cuda")[:len(splits)])
        res = torch.randn(1, sum(splits), device="cuda", dtype=torch.bfloat16)
        kept = torch.zeros(len(splits), dtype=torch.int64, device="cuda")
        y = sparse_linear(x, pw, t, residual=res, kept=kept, **kwargs)
        ref = res.double() + reference(xin, W.t().double(), t, splits)
        err = rel_err(y, ref)
        worst["fused_bf16"] = max(worst.get("fused_bf16", 0.0), err)
        # An entry within an ulp of a threshold may land on either side (the rms differs in its last bits).
        off = (kept - count_kept(xin, t)).abs().max().item()
        assert torch.isfinite(y).all() and err < 1e-2 and off <= 2, (in_f, splits, form, err, off)

    # Determinism: the split-K reduction runs in a fixed order.
    pw = pack_weight(torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16) * 0.02)
    x = torch.randn(1, 14336, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([0.67], device="cuda")
    ys = [sparse_linear(x, pw, t) for _ in range(20)]
    assert all(torch.equal(ys[0], y) for y in ys)

    # CUDA graph: capture once, replay with new inputs and thresholds.
    pw = pack_weight(torch.randn(6144, 4096, device="cuda", dtype=torch.bfloat16) * 0.02, "bf16", (4096, 1024, 1024))
    x = torch.randn(1, 1, 4096, device="cuda", dtype=torch.bfloat16)
    t = torch.zeros(3, device="cuda")
    warm_up(pw)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = sparse_linear(x, pw, t)
    for _ in range(5):
        x.copy_(torch.randn_like(x))
        t.copy_(torch.rand(3, device="cuda") * 1.5)
        graph.replay()
        assert torch.equal(y, sparse_linear(x, pw, t))

    # torch.compile with CUDA graphs: thresholds are tensors, so new values reuse the graph.
    pw_o = pack_weight(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02)
    t_o = torch.zeros(1, device="cuda")

    def step(x):
        q, k, v = sparse_linear(x, pw, t).split([4096, 1024, 1024], dim=-1)
        # Outputs compared apart: fused adds round once under inductor, eager rounds each bf16 add,
        # and (y + k.sum()) + v.sum() cancels into errors of 8 ulps. q goes in as the kernel wrote
        # it: an op fused in between would flip entries that sit at the threshold.
        return sparse_linear(q, pw_o, t_o), k, v

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for i in range(6):
        if i == 3:
            torch._dynamo.config.error_on_recompile = True
        x = torch.randn(1, 1, 4096, device="cuda", dtype=torch.bfloat16)
        t.copy_(torch.rand(3, device="cuda"))
        t_o.fill_(0.1 * i)
        for got, want in zip([y.clone() for y in compiled(x)], step(x)):
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    torch._dynamo.config.error_on_recompile = False
    return {"worst_rel_err": worst, "cuda_graph_replay": "bitwise equal to eager",
            "compile_reduce_overhead": "no recompiles over threshold changes"}


def kernel_report():
    """Registers, spills and 16-byte loads of each compiled variant (PTX ld.global.v4 count)."""
    out = []
    try:
        for caches in gemv._sparse_gemv_kernel.device_caches.values():
            for k in caches[0].values():
                ptx = k.asm.get("ptx", "")
                out.append({"constants": str(getattr(k.src, "constants", "")), "n_regs": k.n_regs, "n_spills": k.n_spills,
                            "ld_global_v4": len(re.findall(r"ld\.global[.\w:]*\.v4", ptx)),
                            "ld_global": len(re.findall(r"ld\.global", ptx))})
    except Exception:
        traceback.print_exc()
    return out


def run_shape(name, in_f, splits, dtypes, tune, copy_bw):
    N = sum(splits)
    rows = []
    cfg = None
    for fmt in dtypes:
        dtype = DTYPES[fmt]
        x = torch.randn(1, in_f, device="cuda", dtype=dtype)
        key = (in_f, tuple(splits), dtype, 1, str(x.device))
        if tune and cfg is None:
            cfg = gemv.tune(in_f, splits, dtype)
        cfg = cfg or gemv.choose_config(in_f, splits, dtype, 1, x.device)
        Ws = [torch.randn(N, in_f, device="cuda", dtype=dtype) * 0.02  # [out, in] as nn.Linear
              for _ in range(gemv.weight_copies(N * in_f * dtype.itemsize, x.device))]
        pws = [pack_weight(W, fmt, splits) for W in Ws]
        W64 = pws[0].data.double()
        t_cublas = gemv.time_in_graph([lambda W=W: torch.matmul(x, W.t()) for W in Ws])
        t_cublas_flush = gemv.time_in_graph([lambda: torch.matmul(x, Ws[0].t())], flush_l2=True)
        t_dense_packed = gemv.time_in_graph([lambda pw=pw: torch.matmul(x, pw.data) for pw in pws])
        elt = dtype.itemsize
        variants = {"chosen": cfg}
        if fmt == "bf16" and tune:
            logged = [(c, sum(t)) for k, c, t in gemv.tune_log if k[:2] == (in_f, tuple(splits))]
            for label, compact in [("compact", True), ("masked", False)]:
                variants[label] = min((e for e in logged if e[0].compact == compact), key=lambda e: e[1])[0]
        for (variant, vcfg), s in [(v, s) for v in variants.items() for s in SPARSITIES]:
            gemv._tuned_here[key] = vcfg
            thr = torch.quantile(x.float().abs().flatten(), s).item() if s > 0 else 0.0
            t = torch.full((len(splits),), thr, device="cuda")
            zero = (x.float().abs() <= thr).float().mean().item()
            y = sparse_linear(x, pws[0], t)
            err = rel_err(y, reference(x, W64, t, splits))
            us = gemv.time_in_graph([lambda pw=pw: sparse_linear(x, pw, t) for pw in pws])
            us_flush = gemv.time_in_graph([lambda: sparse_linear(x, pws[0], t)], flush_l2=True) if variant == "chosen" else None
            needed = (1 - zero) * in_f * N * elt + (in_f + N) * elt
            rows.append(dict(shape=name, in_features=in_f, splits=list(splits), dtype=fmt, sparsity=s, variant=variant,
                             zero_fraction=zero, us=us, cublas_us=t_cublas, cublas_packed_layout_us=t_dense_packed,
                             speedup=t_cublas / us, bytes_needed=needed, tb_per_s=needed / us * 1e-6,
                             pct_copy_bw=100 * needed / (us * 1e-6) / copy_bw, floor_us=needed / copy_bw * 1e6,
                             us_flush=us_flush, cublas_us_flush=t_cublas_flush,
                             speedup_flush=t_cublas_flush / us_flush if us_flush else None,
                             rel_err=err, config=vars(vcfg), split_k=triton.cdiv(in_f, vcfg.rows_per_program)))
        gemv._tuned_here[key] = cfg
        del Ws, pws, W64
    return rows


def plot(results, copy_bw, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["shape"] for r in results))
    cols = 5
    fig, axes = plt.subplots(math.ceil(len(names) / cols), cols, figsize=(4 * cols, 3.2 * math.ceil(len(names) / cols)), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for fmt, color in [("bf16", "C0"), ("fp16", "C1")]:
            rs = [r for r in results if r["shape"] == name and r["dtype"] == fmt]
            if not rs:
                continue
            s = [r["sparsity"] for r in rs]
            ax.plot(s, [r["us"] for r in rs], "o-", color=color, label=f"sparse {fmt}")
            ax.axhline(rs[0]["cublas_us"], color=color, ls="--", lw=1, label=f"cuBLAS {fmt}")
            if fmt == "bf16":
                ax.plot(s, [r["floor_us"] for r in rs], ":", color="k", label="bytes / copy bw")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("us")
        ax.set_ylim(bottom=0)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Sparse GEMV, 1 token, {torch.cuda.get_device_name()} (copy {copy_bw / 1e12:.2f} TB/s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--no-tune", action="store_true", help="use the shipped table instead of tuning here")
    p.add_argument("--no-check", action="store_true")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)

    props = torch.cuda.get_device_properties(0)
    started = time.time()
    try:
        checks = {} if args.no_check else check()
    except Exception:
        traceback.print_exc()
        checks = {"failed": traceback.format_exc()}
    print("checks:", checks, f"({time.time() - started:.0f} s)", flush=True)
    copy_bw = copy_bandwidth()
    results = []
    everything = []
    for name, in_f, splits in tqdm(shapes(args.models), desc="shapes"):
        everything += run_shape(name, in_f, splits, args.dtypes, not args.no_tune, copy_bw)
    results = [r for r in everything if r["variant"] == "chosen"]

    tag = torch.cuda.get_device_name().split()[1].lower()
    meta = dict(device=torch.cuda.get_device_name(), sms=props.multi_processor_count, l2_mb=props.L2_cache_size / 2**20,
                torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                command="python -m scripts.benchmark_gemv " + " ".join(sys.argv[1:]), copy_tb_per_s=copy_bw / 1e12, checks=checks,
                kernels=kernel_report(), seconds=time.time() - started,
                tune_log=[dict(key=str(k), config=vars(c), us=t) for k, c, t in gemv.tune_log])
    with open(os.path.join(args.out, f"gemv_{tag}.json"), "w") as f:
        json.dump(dict(meta=meta, results=results, variants=[r for r in everything if r["variant"] != "chosen"]), f, indent=1)
    try:
        plot(results, copy_bw, os.path.join(args.out, f"gemv_{tag}.png"))
    except Exception:
        traceback.print_exc()

    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  copy {copy_bw / 1e12:.2f} TB/s")
    print("us (speedup vs cuBLAS, % of copy bandwidth on needed bytes); rel err vs float64 is the max over sparsities")
    for fmt in args.dtypes:
        print(f"\n{fmt:<18}{'cuBLAS':>8}" + "".join(f"{s:>17.0%}" for s in SPARSITIES) + f"{'max err':>9}  config")
        for name in dict.fromkeys(r["shape"] for r in results):
            rs = [r for r in results if r["shape"] == name and r["dtype"] == fmt]
            c = rs[0]["config"]
            print(f"{name:<18}{rs[0]['cublas_us']:>8.1f}" + "".join(f"{r['us']:>6.1f} ({r['speedup']:.2f},{r['pct_copy_bw']:3.0f})" for r in rs)
                  + f"{max(r['rel_err'] for r in rs):>9.1e}  {c['block_n']}x{c['block_k']} r{c['rows_per_program']} w{c['num_warps']} sk{rs[0]['split_k']} {'compact' if c['compact'] else 'masked'}")
    print_flush(results)
    print_targets(results)
    print_variants(everything)


def print_variants(rows):
    """The best config of each kernel loop (from tuning) across sparsities, bf16."""
    ab = [r for r in rows if r["variant"] != "chosen" and r["dtype"] == "bf16"]
    if not ab:
        return
    print("\nvariants, bf16 us at " + " ".join(f"{s:.0%}" for s in SPARSITIES))
    for name in dict.fromkeys(r["shape"] for r in ab):
        for v in dict.fromkeys(r["variant"] for r in ab if r["shape"] == name):
            rs = [r for r in ab if r["shape"] == name and r["variant"] == v]
            c = rs[0]["config"]
            print(f"  {name:<18} {v:<20}" + "".join(f"{r['us']:7.1f}" for r in rs) + f"   {c['block_n']}x{c['block_k']} r{c['rows_per_program']} w{c['num_warps']}"
                  + f" sk{rs[0]['split_k']} max err {max(r['rel_err'] for r in rs):.1e}")


def print_flush(results):
    """The do_bench way (L2 zeroed before each call), to set beside ../shared/ANCHORS.md, bf16."""
    print("\nflush-timed (do_bench's way), bf16: us (speedup vs cuBLAS timed alike)")
    print(f"{'':<18}{'cuBLAS':>8}" + "".join(f"{s:>14.0%}" for s in SPARSITIES))
    for name in dict.fromkeys(r["shape"] for r in results):
        rs = [r for r in results if r["shape"] == name and r["dtype"] == "bf16"]
        if rs:
            print(f"{name:<18}{rs[0]['cublas_us_flush']:>8.1f}" + "".join(f"{r['us_flush']:>7.1f} ({r['speedup_flush']:.2f})" for r in rs))


def print_targets(results):
    """Issue 3's targets, on the Llama-3-8B shapes in bf16."""
    def get(shape, s):
        return next(r for r in results if r["shape"] == f"llama-3-8b {shape}" and r["dtype"] == "bf16" and r["sparsity"] == s)

    if not any(r["shape"].startswith("llama-3-8b") and r["dtype"] == "bf16" for r in results):
        return
    print("\ntargets (llama-3-8b, bf16):")
    for shape, want in [("gate", 2.2), ("gate_up", 2.2), ("down", 2.2), ("qkv", 1.6), ("o", 1.6)]:
        r0, r5 = get(shape, 0.0), get(shape, 0.5)
        print(f"  {shape:<8} 50%: {r5['speedup']:.2f}x (want {want})  0%: {r0['speedup']:.2f}x (want 1.05)")
    for shape in ["gate", "gate_up", "down"]:
        pct = [get(shape, s)["pct_copy_bw"] for s in (0.0, 0.25, 0.4, 0.5)]
        print(f"  {shape:<8} % of copy bandwidth at 0/25/40/50%: " + " ".join(f"{p:.0f}" for p in pct) + " (want >= 85)")
    worst = max((r for r in results if r["shape"].startswith("llama-3-8b") and r["dtype"] == "bf16"), key=lambda r: r["rel_err"])
    print(f"  max rel err {worst['rel_err']:.1e} (want < 2e-3)")
    for name in dict.fromkeys(r["shape"] for r in results):
        for fmt in ("bf16", "fp16"):
            us = [r["us"] for r in results if r["shape"] == name and r["dtype"] == fmt]
            rise = max([100 * (b / a - 1) for a, b in zip(us, us[1:])] or [0])
            if rise > 0:
                print(f"  not monotone: {name} {fmt}: +{rise:.1f}% at a higher sparsity")


if __name__ == "__main__":
    main()
