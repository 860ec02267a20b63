"""Batch-1 decode latency, dense against TEAL sparsities, end to end through generate.py's loop.

A random-weight model is built at a real shape directly on the device (no checkpoint needed), in
each weight format asked for (--weights: bf16, int8, int4; quantized on the GPU one projection at
a time, so a 70B int8 model fits where its bf16 one would not), and its uniform thresholds are
calibrated on its own activations from random-token prompts, so the sparsity reported is measured
during decode, not assumed. With --checkpoint, a real model and its thresholds file are used.

    python -m scripts.benchmark_decode --model llama-3-8b
    python -m scripts.benchmark_decode --model llama-3-8b --weights bf16 int8 int4
    python -m scripts.benchmark_decode --model llama-3-8b --weights bf16 int8 int4 --lm-head int8
    python -m scripts.benchmark_decode --model llama-3-8b --weights int8 --tune   # GEMV configs tuned first
    python -m scripts.benchmark_decode --model llama-3-8b --weights bf16 int8 --persistent   # + the persistent kernel's rows
    python -m scripts.benchmark_decode --model llama-3-70b --weights int8 --sparsities 0.4,0.5,0.6
    torchrun --nproc_per_node 2 -m scripts.benchmark_decode --model llama-3-70b --weights bf16 int8 --sparsities 0.4,0.5

Rows, for each format: its dense decode through plain torch (bf16: the model's own matmuls, the
gpt-fast-style compiled step every ratio is against; int8: gpt-fast's weight-only int8 linear;
int4: torch's tinygemm), the sparse kernels at threshold 0 ("t=0"), then each sparsity. Ratios are
against the first row of the run (dense bf16 where it is measured). Each format's fixed cost: the
intercept of step time against bytes read over its t=0 and sparse rows, divided by the
projections a step runs. --persistent adds, for each format, its t=0 and sparse rows with the
persistent decode kernel (every layer of a step in one launch), and their fixed cost.

On the CPU (--device cpu) the step is eager (the sparse projections are the C++ kernel,
sparse_kernels/cpu.py; the dense row is torch's own matmuls), and the ceiling is a 256 MiB copy's
bandwidth on the same threads; the machine, its threads and load average are in the results.
--interleave times the variants in turn instead, a run each in each of --runs rounds: on a shared
machine the load drifts between rows timed one after another, less within a round.

    python -m scripts.benchmark_decode --device cpu --checkpoint ~/.cache/teal/smollm2-135m-instruct --dtype fp32 --sparsities 0.25,0.4,0.5
    python -m scripts.benchmark_decode --device cpu --checkpoint ~/.cache/teal/smollm2-135m-instruct --dtype fp32 --sparsities 0.4,0.5 --runs 3 --interleave
    python -m scripts.benchmark_decode --device cpu --model tiny --dtype fp32 --runs 3

Under torchrun (tp.py) each rank holds its shard (the random model's weights drawn per shard, its
thresholds rank 0's, calibrated on rank 0's shard, on every rank); every row adds the time a step's
all-reduces take alone, timed after its runs, and tok/s, bytes and the ceiling are one GPU's. Rank 0
writes the results.
"""
import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

import generate
import thresholds
import tp
from checkpoint import atomic_write_text, quantization_of
from generate import DTYPES, UsageError, cli
from model import PROJECTIONS, ModelArgs
from quantize import dense_baseline
from scripts.common import RESULTS, environment, save_figure, save_json
from sparse_kernels import check_decode_layers, quantize
from sparse_kernels import tuning
from sparse_kernels.tuning import copy_bandwidth

WEIGHTS = {"bf16": (None, None), "int8": ("int8", None), "int4": ("int4", 128)}


@torch.no_grad()
def random_model(name, dtype, device, fmt=None, group_size=None, head=None, seed=0):
    """Weights ~ N(0, 0.02), norms 1: a real shape with no checkpoint. Quantized formats take the
    same float weights (same seed), quantized by round-to-nearest one projection at a time (and
    lm_head with head="int8"). Under torchrun, this rank's shard."""
    torch.manual_seed(seed)
    model = tp.build(ModelArgs.from_name(name), dtype=dtype, fmt=fmt, group_size=group_size, head=head, device=device)
    for pname, p in model.named_parameters():
        p.fill_(1.0) if pname.endswith("norm.weight") else p.normal_(0.0, 0.02)
    for pw in [proj.weight for proj in model.projections()] + [w for w in [model.packed_head()] if w is not None]:
        W = torch.randn(pw.out_features, pw.in_features, device=device) * 0.02
        pw.load(quantize(W, pw.fmt, group_size) if pw.quantized else {"weight": W})
    return model.eval()


def cpu_copy_bandwidth(runs=10):
    """Bytes read + written per second by a 256 MiB copy on the CPU (torch's threads, median of
    runs): 8x the last-level caches of common machines, so it measures memory, the CPU's ceiling."""
    src = torch.ones(1 << 28, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = []
    for _ in range(runs):
        t0 = time.perf_counter()
        dst.copy_(src)
        seconds.append(time.perf_counter() - t0)
    return 2 * src.numel() / statistics.median(seconds)


def cpu_name():
    """The processor's model name (Linux), else what platform knows."""
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def random_thresholds(model, windows, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (windows, length), generator=g)
    return tp.broadcast(thresholds.calibrate(model, tokens))  # the same thresholds on every rank


def time_decode(model, decode, sparse, prompt, new_tokens, runs, device):
    """-> tok/s of each timed run (generated tokens over the whole generate call, as gpt-fast counts)."""
    rates = []
    for _ in range(runs):
        generate.sync(device)
        t0 = time.perf_counter()
        generate.generate(model, prompt, new_tokens, decode, sparse)
        generate.sync(device)
        rates.append(new_tokens / (time.perf_counter() - t0))
    return rates


def measure_sparsity(model, prompt, new_tokens):
    """Eager, so the compiled graphs (recorded with the counters off) are neither changed nor
    recompiled: the same tokens pass the same thresholds either way."""
    model.record_sparsity(True)
    generate.generate(model, prompt, new_tokens, generate.decode_one_token, True)
    measured = model.measured_sparsity()
    model.record_sparsity(False)
    return measured


@torch.no_grad()
def profile_decode(model, decode, sparse, prompt, steps, device):
    """CUDA: per decode step, wall time, device-kernel time, launch gaps, and the kernels that take it."""
    from torch.profiler import ProfilerActivity, profile

    T = prompt.numel()
    greedy = torch.zeros((), dtype=torch.float32, device=device)  # the tensor temperature generate() passes
    first = generate.prefill(model, prompt.view(1, -1), torch.arange(T, device=device), False, greedy, None)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate.sync(device)
        t0 = time.perf_counter()
        generate.decode_n_tokens(decode, model, first, torch.tensor([T], device=device), steps, sparse, greedy, None)
        generate.sync(device)
        wall = time.perf_counter() - t0
    # Device kernels only: CPU-side ops would count the same work twice.
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    us = lambda e: getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
    total = sum(us(e) for e in kernels) / steps
    top = sorted(kernels, key=us, reverse=True)[:15]
    nccl = sum(us(e) for e in kernels if "nccl" in e.key.lower()) / steps  # tensor parallelism's all-reduces
    return dict(steps=steps, wall_us_per_step=wall * 1e6 / steps, kernel_us_per_step=total, nccl_us_per_step=nccl,
                gap_us_per_step=wall * 1e6 / steps - total, kernels_per_step=sum(e.count for e in kernels) / steps,
                top_kernels=[dict(name=e.key[:120], us_per_step=us(e) / steps, calls_per_step=e.count / steps) for e in top])


def use_sparsity(model, table, sparsity, method):
    """The thresholds of a model-wide sparsity (0: all zero, the kernels dense)."""
    model.set_thresholds(table.at(sparsity, method) if sparsity > 0 else torch.zeros(model.config.n_layer, len(PROJECTIONS)))


def warm_up(model, decode, sparse, sparsity, table, prompt, args):
    """One untimed generation at this sparsity (the compile and the CUDA graph's recording) -> its seconds."""
    use_sparsity(model, table, sparsity, args.method)
    t0 = time.perf_counter()
    generate.generate(model, prompt, args.new_tokens, decode, sparse)
    generate.sync(args.device)
    return time.perf_counter() - t0


def run_variant(model, decode, label, sparse, sparsity, table, prompt, args, bandwidth, read=None):
    """Time one variant -> its row. sparse with sparsity 0: the sparse kernels at threshold 0.
    read: the bytes a step reads where the model cannot say (a dense baseline's modules)."""
    warmup_s = warm_up(model, decode, sparse, sparsity, table, prompt, args)
    rates = time_decode(model, decode, sparse, prompt, args.new_tokens, args.runs, args.device)
    return variant_row(model, decode, label, sparse, sparsity, rates, warmup_s, prompt, args, bandwidth, read)


def run_interleaved(model, decode, variants, table, prompt, args, bandwidth):
    """--interleave: every variant warmed up, then --runs rounds that time each once, in turn ->
    their rows, each with the median of its rounds' ratios to the first variant (ratio_to_first)
    and the load average after each round: on a shared machine the load drifts between rows timed
    one after another, less within one round."""
    warmup_s = [warm_up(model, decode, sparse, s, table, prompt, args) for _, sparse, s in variants]
    rates, loads = [[] for _ in variants], []
    for _ in tqdm(range(args.runs), desc="interleaved rounds", unit="round"):
        for i, (_, sparse, s) in enumerate(variants):
            use_sparsity(model, table, s, args.method)
            rates[i] += time_decode(model, decode, sparse, prompt, args.new_tokens, 1, args.device)
        loads.append(os.getloadavg()[0])
    rows = []
    for (label, sparse, s), r, w in zip(variants, rates, warmup_s):
        use_sparsity(model, table, s, args.method)
        row = variant_row(model, decode, label, sparse, s, r, w, prompt, args, bandwidth)
        rows.append(dict(row, ratio_to_first=statistics.median(a / b for a, b in zip(r, rates[0])), load_average_rounds=loads))
    return rows


def variant_row(model, decode, label, sparse, sparsity, rates, warmup_s, prompt, args, bandwidth, read=None):
    """A timed variant's row: its rates, the sparsity measured while decoding, bytes, ceiling."""
    measured = measure_sparsity(model, prompt, args.new_tokens) if sparsity > 0 else torch.zeros(model.config.n_layer, len(PROJECTIONS))
    tok_s = statistics.median(rates)
    read = read or generate.bytes_per_token(model, measured)
    row = dict(variant=label, target_sparsity=sparsity, tok_s=tok_s, tok_s_runs=rates, ms_per_token=1e3 / tok_s,
               measured_sparsity=thresholds.model_wide(measured, model.projection_sizes()),
               measured_per_projection=dict(zip(PROJECTIONS, measured.mean(0).tolist())),
               bytes_per_token=read, effective_GBps=read * tok_s / 1e9, first_call_s=warmup_s)
    if args.profile_steps and args.device.startswith("cuda"):
        row["profile"] = profile_decode(model, decode, sparse, prompt, args.profile_steps, args.device)
    if tp.world_size() > 1:
        row["all_reduce_us_per_step"] = tp.all_reduce_seconds(model) * 1e6
    if bandwidth:
        row["ceiling_tok_s"] = bandwidth / read
        row["fraction_of_ceiling"] = tok_s / row["ceiling_tok_s"]
    return row


def fixed_cost(rows, projections):
    """Least squares ms/token = a + bytes / b over a format's kernel rows -> (a, in us per projection
    a step runs, and b in GB/s)."""
    xs, ys = [r["bytes_per_token"] for r in rows], [r["ms_per_token"] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((v - mx) ** 2 for v in xs)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sxx if sxx else 0.0
    return dict(fixed_us_per_projection=(my - slope * mx) * 1e3 / projections, fitted_GBps=1e-6 / slope if slope > 0 else None)


def markdown(result):
    first = result["rows"][0]
    world = result.get("world_size", 1)
    ar = world > 1  # tensor parallelism: each step's all-reduce time beside its tok/s
    cpu = (f" {result['cpu']}, {result['threads']} threads, load average {result['load_average_before'][0]:.2f} before,"
           f" {result.get('load_average_after', [0])[0]:.2f} after; ceiling: a copy's {result['copy_bandwidth_GBps']:.1f} GB/s."
           if "cpu" in result else "")
    rounds = (f" Interleaved: {len(first['tok_s_runs'])} rounds timing each row once in turn, ratios the median of the"
              f" rounds' (load average after each: {', '.join(f'{v:.1f}' for v in first['load_average_rounds'])})."
              if "ratio_to_first" in first else "")
    lines = [f"Ratios against {first['variant']} in the same run." + rounds
             + (f" {world} ranks (tensor parallel); GB/s and the ceiling are one GPU's." if ar else "") + cpu, "",
             "| variant | target | measured sparsity | tok/s | ms/token |" + (" all-reduce us/step |" if ar else "")
             + " vs first | GB/s read | of ceiling |",
             "|---|---|---|---|---|" + ("---|" if ar else "") + "---|---|---|"]
    for r in result["rows"]:
        ceiling = f"{r['fraction_of_ceiling']:.0%}" if "fraction_of_ceiling" in r else "-"
        reduce = f" {r['all_reduce_us_per_step']:.0f} |" if ar else ""
        lines.append(f"| {r['variant']} | {r['target_sparsity']:.2f} | {r['measured_sparsity']:.3f} | {r['tok_s']:.1f} | "
                     f"{r['ms_per_token']:.2f} |{reduce} {r.get('ratio_to_first', r['tok_s'] / first['tok_s']):.2f}x | {r['effective_GBps']:.0f} | {ceiling} |")
    if result.get("fixed_costs"):
        lines += ["", "| variant | fixed cost a projection (us) | fitted GB/s |", "|---|---|---|"]
        lines += [f"| {f} | {c['fixed_us_per_projection']:.2f} | {c['fitted_GBps'] or 0:.0f} |" for f, c in result["fixed_costs"].items()]
    for r in result["rows"]:
        if "profile" in r:
            f = r["profile"]
            nccl = f", {f['nccl_us_per_step']:.0f} us of them NCCL's" if ar else ""
            lines += ["", f"{r['variant']}, one decode step under torch.profiler: {f['wall_us_per_step']:.0f} us wall, "
                      f"{f['kernel_us_per_step']:.0f} us in {f['kernels_per_step']:.0f} kernels{nccl}, {f['gap_us_per_step']:.0f} us of gaps", "",
                      "| kernel | us/step | calls/step |", "|---|---|---|"]
            lines += [f"| `{k['name'][:70]}` | {k['us_per_step']:.1f} | {k['calls_per_step']:.0f} |" for k in f["top_kernels"][:8]]
    return "\n".join(lines) + "\n"


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for i, fmt in enumerate(dict.fromkeys(r["format"] for r in result["rows"])):
        rows = [r for r in result["rows"] if r["format"] == fmt and r["kind"] == "kernel"]
        ax.plot([r["measured_sparsity"] for r in rows], [r["tok_s"] for r in rows], "o-", color=f"C{i}", label=f"{fmt} sparse kernels")
        persistent = [r for r in result["rows"] if r["format"] == fmt and r["kind"] == "persistent"]
        if persistent:
            ax.plot([r["measured_sparsity"] for r in persistent], [r["tok_s"] for r in persistent], "s-", color=f"C{i}", alpha=0.6,
                    label=f"{fmt} persistent kernel")
        for r in result["rows"]:
            if r["format"] == fmt and r["kind"] == "dense":
                ax.axhline(r["tok_s"], color=f"C{i}", ls="--", lw=1, label=f"{r['variant']} ({r['tok_s']:.0f} tok/s)")
        if rows and "ceiling_tok_s" in rows[0]:
            ax.plot([r["measured_sparsity"] for r in rows], [r["ceiling_tok_s"] for r in rows], ":", color=f"C{i}", lw=1)
    ax.set_xlabel("measured activation sparsity")
    ax.set_ylabel("tokens / s (batch 1)")
    ax.set_title(f"{result['model']} on {result['device_name']} (dotted: copy-bandwidth ceiling)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(path, fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", help="config name for a random-weight model")
    p.add_argument("--checkpoint", help="benchmark a real checkpoint with its thresholds file instead")
    p.add_argument("--sparsities", default="0.25,0.4,0.5,0.6")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="activations (and float weights)")
    p.add_argument("--weights", nargs="+", default=["bf16"], help="weight formats to build the random model in: bf16 int8 int4")
    p.add_argument("--group-size", type=int, default=128, help="int4's group size")
    p.add_argument("--lm-head", choices=("float", "int8"), default="float", help="the int8 and int4 models' lm_head (default: float)")
    p.add_argument("--persistent", action="store_true",
                   help="add each format's rows with the persistent decode kernel (every layer of a step in one launch)")
    p.add_argument("--tune", action="store_true", help="CUDA only: tune each projection's GEMV config first, in this process")
    p.add_argument("--method", choices=("greedy", "uniform"), default="greedy",
                   help="per-projection sparsities where the thresholds file has greedy rows (a random model's has none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompt-tokens", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--interleave", action="store_true",
                   help="time the variants in turn, --runs rounds of one run each; ratios: the median of the rounds' (for a shared machine)")
    p.add_argument("--calibration-windows", type=int, default=8)
    p.add_argument("--calibration-length", type=int, default=128)
    p.add_argument("--profile-steps", type=int, default=20, help="CUDA only: decode steps under torch.profiler per variant (0: none)")
    p.add_argument("--no-compile", action="store_true", help="eager decode (always on the CPU)")
    p.add_argument("--out", help="results stem (default benchmarks/results/decode_<model>_<dtype>)")
    return p.parse_args(argv)


def formats_of(args):
    """--weights -> [(label, fmt, group size, head)]: --lm-head int8 gives the quantized formats an
    int8 head (label -head8); bf16 keeps its own, the reference every ratio is against."""
    out = []
    for w in args.weights:
        if w not in WEIGHTS:
            raise UsageError(f"--weights takes bf16, int8 and int4, got {w!r}")
        fmt, group = WEIGHTS[w]
        head = args.lm_head if fmt and args.lm_head == "int8" else None
        name = args.dtype if fmt is None else w  # float weights: the activations' dtype
        label = (name if fmt != "int4" else f"int4-g{args.group_size}") + ("-head8" if head else "")
        out.append((label, fmt, args.group_size if fmt == "int4" else None, head))
    return out


def tune_projections(model, result):
    """--tune: the GEMV config of each of the model's projection shapes in its weight format, tuned
    in this process (sparse_kernels.tuning; it outranks the table), and recorded in the result."""
    for proj, _ in tqdm(model.layers[0].projections(), desc="tune", unit="shape"):
        pw = proj.weight
        cfg = tuning.tune(pw.in_features, pw.splits, pw.fmt, pw.group_size, device=pw.data.device)
        result.setdefault("tuned", []).append(dict(in_features=pw.in_features, splits=list(pw.splits), format=pw.fmt,
                                                   config=repr(cfg)))


def save(stem, result):
    """The results so far, as JSON; under torchrun rank 0's, which rank 0 writes."""
    if tp.rank() == 0:
        save_json(stem.with_suffix(".json"), result)


def run_format(model, label, table, prompt, args, bandwidth, result, stem):
    """Dense baseline first (plain torch: the model's matmuls for bf16), then the sparse kernels at
    t = 0 and every sparsity, then (int8, int4) the dense quantized baseline, last because it
    replaces the model's weights in place; each row saved as it comes."""
    fmt = model.projections()[0].weight.fmt
    eager = args.no_compile or not args.device.startswith("cuda")  # the CPU's step: eager (README, Benchmarks)
    decode = generate.decode_one_token if eager else generate.compile_decode()
    kernel_rows = []
    read = generate.bytes_per_token(model, torch.zeros(model.config.n_layer, len(PROJECTIONS)))
    variants = [(f"{label} t=0 (sparse kernels)", True, 0.0)] + [(f"{label} sparse {s:g}", True, s) for s in args.sparsities]
    if fmt not in ("int8", "int4"):
        variants.insert(0, (f"{label} dense (torch)", False, 0.0))
    if args.interleave:
        rows = run_interleaved(model, decode, variants, table, prompt, args, bandwidth)
    else:
        rows = (run_variant(model, decode, name, sparse, s, table, prompt, args, bandwidth)
                for name, sparse, s in tqdm(variants, desc=label, unit="variant"))
    for row, (_, sparse, _) in zip(rows, variants):
        row.update(format=label, kind="kernel" if sparse else "dense")
        result["rows"].append(row)
        kernel_rows += [row] if sparse else []
        save(stem, result)
    result.setdefault("fixed_costs", {})[label] = fixed_cost(kernel_rows, 4 * model.config.n_layer)
    save(stem, result)
    if args.persistent and model.use_persistent():
        # The same steps with every layer in one persistent kernel (sparse_kernels.persistent).
        torch._dynamo.reset()  # the step's graph changes: compile afresh
        decode = generate.decode_one_token if eager else generate.compile_decode()
        rows = []
        for name, s in tqdm([(f"{label} persistent t=0", 0.0)] + [(f"{label} persistent {s:g}", s) for s in args.sparsities],
                            desc=f"{label} persistent", unit="variant"):
            row = run_variant(model, decode, name, True, s, table, prompt, args, bandwidth)
            row.update(format=label, kind="persistent")
            result["rows"].append(row)
            rows.append(row)
            save(stem, result)
        check_decode_layers()
        model.use_persistent(False)
        result["fixed_costs"][f"{label} persistent"] = fixed_cost(rows, 4 * model.config.n_layer)
        save(stem, result)
    if fmt in ("int8", "int4") and args.device.startswith("cuda"):
        torch._dynamo.reset()  # new modules: compile afresh rather than pile guards on the old graphs
        baseline = {"int8": "gpt-fast int8 linear", "int4": "tinygemm int4"}[fmt]
        row = run_variant(dense_baseline(model), generate.compile_decode(), f"{label} dense ({baseline})", False, 0.0, table,
                          prompt, args, bandwidth, read=read)
        row.update(format=label, kind="dense")
        result["rows"].append(row)
        save(stem, result)


def main(argv=None):
    tp.quiet()  # under torchrun, rank 0 alone prints
    args = parse_args(argv)
    try:
        args.sparsities = [float(s) for s in args.sparsities.split(",") if s]
    except ValueError:
        raise UsageError(f"--sparsities expects comma-separated numbers, got {args.sparsities!r}") from None
    if any(not 0 < s < 1 for s in args.sparsities):
        raise UsageError(f"--sparsities must lie in (0, 1), got {args.sparsities}")
    args.device = device = tp.init(generate.resolve_device(args.device))  # under torchrun: this rank's device
    dtype = DTYPES[args.dtype]
    bandwidth = copy_bandwidth(device) if device.startswith("cuda") else cpu_copy_bandwidth()
    result = dict(model=args.checkpoint or args.model, dtype=args.dtype, **environment(device, "benchmark_decode", argv),
                  prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, runs=args.runs,
                  copy_bandwidth_GBps=bandwidth / 1e9 if bandwidth else None, world_size=tp.world_size(), rows=[])
    if not device.startswith("cuda"):
        from sparse_kernels import cpu

        # The machine, and how busy it was: a shared machine's load shows in every row.
        result.update(cpu=cpu_name(), threads=torch.get_num_threads(), load_average_before=os.getloadavg(),
                      cpu_kernel=cpu.enabled(), omp_env={k: v for k, v in os.environ.items() if k.startswith("OMP_")})
    cache_len = args.prompt_tokens + max(args.new_tokens, args.profile_steps + 1)
    if args.checkpoint:
        model, meta, _, ckpt = generate.load_model(args.checkpoint, device, dtype)
        result["model"] = meta.get("name", ckpt.parent.name)
        table, _ = generate.find_table(meta, ckpt, config=model.config)
        runs = [((quantization_of(meta) or {}).get("mode") or args.dtype, lambda m=model, t=table: (m, t))]
    else:
        runs = []
        for label, fmt, group, head in formats_of(args):
            def build(fmt=fmt, group=group, head=head):
                m = random_model(args.model, dtype, device, fmt, group, head)
                return m, random_thresholds(m, args.calibration_windows, args.calibration_length)
            runs.append((label, build))
    tp_tag = f"_tp{tp.world_size()}" if tp.world_size() > 1 else ""
    stem = Path(args.out) if args.out else RESULTS / f"decode_{result['model']}_{'_'.join(label for label, _ in runs)}{tp_tag}"
    for label, build in runs:
        model, table = build()
        result["method"] = args.method if table.greedy is not None else "uniform"
        if args.tune and device.startswith("cuda"):
            tune_projections(model, result)
        model.setup_caches(1, cache_len)
        prompt = torch.randint(0, model.config.vocab_size, (args.prompt_tokens,), dtype=torch.int, device=device,
                               generator=torch.Generator(device).manual_seed(1))
        run_format(model, label, table, prompt, args, bandwidth, result, stem)
        del model
        torch._dynamo.reset()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if "cpu" in result:
        result["load_average_after"] = os.getloadavg()
        save(stem, result)
    if tp.rank() == 0:
        atomic_write_text(stem.with_suffix(".md"), markdown(result))
        plot(result, stem.with_suffix(".png"))
        print(markdown(result))


if __name__ == "__main__":
    cli(main)
