"""Batch-1 decode latency, dense against TEAL sparsities, end to end through generate.py's loop.

A random-weight model is built at a real shape directly on the device (no checkpoint needed) and
its uniform thresholds are calibrated on its own activations from random-token prompts, so the
sparsity reported is measured during decode, not assumed. With --checkpoint, a real model and its
thresholds file are used instead.

    python scripts/benchmark_decode.py --model llama-3-8b
"""
import argparse
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

import generate
import thresholds
from checkpoint import atomic_write_text
from generate import DTYPES, UsageError, cli
from model import PROJECTIONS, ModelArgs, Transformer
from scripts.common import RESULTS, environment, save_figure, save_json


def random_model(name, dtype, device, seed=0):
    """Weights ~ N(0, 0.02), norms 1: a real shape with no checkpoint."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.from_name(name), dtype=dtype, device=device)
    with torch.no_grad():
        for pname, p in list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n.endswith("weight.data")]:
            if pname.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


def random_thresholds(model, windows, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (windows, length), generator=g)
    return thresholds.calibrate(model, tokens)


def copy_bandwidth(device):
    """Bytes read + written per second by a large device-to-device copy: the practical roofline."""
    src = torch.empty(1 << 29, dtype=torch.uint8, device=device)  # 512 MiB, far past L2
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / statistics.median(times)


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
    first = generate.prefill(model, prompt.view(1, -1), torch.arange(T, device=device), False, 0.0, None)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate.sync(device)
        t0 = time.perf_counter()
        generate.decode_n_tokens(decode, model, first, torch.tensor([T], device=device), steps, sparse, 0.0, None)
        generate.sync(device)
        wall = time.perf_counter() - t0
    # Device kernels only: CPU-side ops would count the same work twice.
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    us = lambda e: getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
    total = sum(us(e) for e in kernels) / steps
    top = sorted(kernels, key=us, reverse=True)[:15]
    return dict(steps=steps, wall_us_per_step=wall * 1e6 / steps, kernel_us_per_step=total,
                gap_us_per_step=wall * 1e6 / steps - total, kernels_per_step=sum(e.count for e in kernels) / steps,
                top_kernels=[dict(name=e.key[:120], us_per_step=us(e) / steps, calls_per_step=e.count / steps) for e in top])


def run_variant(model, decode, label, sparsity, table, prompt, args, bandwidth):
    sparse = sparsity > 0
    if sparse:
        model.set_thresholds(table.at(sparsity, args.method))
    t0 = time.perf_counter()
    generate.generate(model, prompt, args.new_tokens, decode, sparse)  # compile and warm up
    generate.sync(args.device)
    warmup_s = time.perf_counter() - t0
    rates = time_decode(model, decode, sparse, prompt, args.new_tokens, args.runs, args.device)
    measured = measure_sparsity(model, prompt, args.new_tokens) if sparse else torch.zeros(model.config.n_layer, len(PROJECTIONS))
    tok_s = statistics.median(rates)
    read = generate.bytes_per_token(model, measured)
    row = dict(variant=label, target_sparsity=sparsity, tok_s=tok_s, tok_s_runs=rates, ms_per_token=1e3 / tok_s,
               measured_sparsity=thresholds.model_wide(measured, model.projection_sizes()),
               measured_per_projection=dict(zip(PROJECTIONS, measured.mean(0).tolist())),
               bytes_per_token=read, effective_GBps=read * tok_s / 1e9, first_call_s=warmup_s)
    if args.profile_steps and args.device.startswith("cuda"):
        row["profile"] = profile_decode(model, decode, sparse, prompt, args.profile_steps, args.device)
    if bandwidth:
        row["ceiling_tok_s"] = bandwidth / read
        row["fraction_of_ceiling"] = tok_s / row["ceiling_tok_s"]
    return row


def markdown(result):
    lines = ["| variant | target | measured sparsity | tok/s | ms/token | vs dense | GB/s read | of ceiling |", "|---|---|---|---|---|---|---|---|"]
    dense = next((r["tok_s"] for r in result["rows"] if r["variant"] == "dense"), None)
    for r in result["rows"]:
        ratio = f"{r['tok_s'] / dense:.2f}x" if dense else "-"
        ceiling = f"{r['fraction_of_ceiling']:.0%}" if "fraction_of_ceiling" in r else "-"
        lines.append(f"| {r['variant']} | {r['target_sparsity']:.2f} | {r['measured_sparsity']:.3f} | {r['tok_s']:.1f} | "
                     f"{r['ms_per_token']:.2f} | {ratio} | {r['effective_GBps']:.0f} | {ceiling} |")
    for r in result["rows"]:
        if "profile" in r:
            f = r["profile"]
            lines += ["", f"{r['variant']}, one decode step under torch.profiler: {f['wall_us_per_step']:.0f} us wall, "
                      f"{f['kernel_us_per_step']:.0f} us in {f['kernels_per_step']:.0f} kernels, {f['gap_us_per_step']:.0f} us of gaps", "",
                      "| kernel | us/step | calls/step |", "|---|---|---|"]
            lines += [f"| `{k['name'][:70]}` | {k['us_per_step']:.1f} | {k['calls_per_step']:.0f} |" for k in f["top_kernels"][:8]]
    return "\n".join(lines) + "\n"


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["variant"] != "dense"]
    dense = next(r for r in result["rows"] if r["variant"] == "dense")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([r["measured_sparsity"] for r in rows], [r["tok_s"] for r in rows], "o-", label="TEAL sparse decode")
    ax.axhline(dense["tok_s"], color="gray", ls="--", label=f"dense ({dense['tok_s']:.0f} tok/s)")
    if "ceiling_tok_s" in dense:
        xs = [0.0] + [r["measured_sparsity"] for r in rows]
        ax.plot(xs, [dense["ceiling_tok_s"]] + [r["ceiling_tok_s"] for r in rows], ":", color="red", label="copy-bandwidth ceiling")
    ax.set_xlabel("measured activation sparsity")
    ax.set_ylabel("tokens / s (batch 1)")
    ax.set_title(f"{result['model']} {result['dtype']} on {result['device_name']}")
    ax.legend()
    fig.tight_layout()
    save_figure(path, fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", help="config name for a random-weight model")
    p.add_argument("--checkpoint", help="benchmark a real checkpoint with its thresholds file instead")
    p.add_argument("--sparsities", default="0.25,0.4,0.5,0.6")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--method", choices=("greedy", "uniform"), default="greedy",
                   help="per-projection sparsities where the thresholds file has greedy rows (a random model's has none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompt-tokens", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--calibration-windows", type=int, default=8)
    p.add_argument("--calibration-length", type=int, default=128)
    p.add_argument("--profile-steps", type=int, default=20, help="CUDA only: decode steps under torch.profiler per variant (0: none)")
    p.add_argument("--no-compile", action="store_true", help="eager decode (for CPU smoke tests)")
    p.add_argument("--out", help="results stem (default benchmarks/results/decode_<model>_<dtype>)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    sparsities = [float(s) for s in args.sparsities.split(",") if s]
    if any(not 0 < s < 1 for s in sparsities):
        raise UsageError(f"--sparsities must lie in (0, 1), got {args.sparsities}")
    device = generate.resolve_device(args.device)
    dtype = DTYPES[args.dtype]

    if args.checkpoint:
        model, meta, _, ckpt = generate.load_model(args.checkpoint, device, dtype)
        name = meta.get("name", ckpt.parent.name)
        table, _ = generate.find_table(meta, ckpt, config=model.config)
    else:
        name = args.model
        model = random_model(name, dtype, device)
        table = random_thresholds(model, args.calibration_windows, args.calibration_length)
    model.setup_caches(1, args.prompt_tokens + max(args.new_tokens, args.profile_steps + 1))
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt_tokens,), dtype=torch.int, device=device)

    decode = generate.decode_one_token if args.no_compile else generate.compile_decode()
    bandwidth = copy_bandwidth(device) if device.startswith("cuda") else None
    result = dict(model=name, dtype=args.dtype, **environment(device, "benchmark_decode", argv),
                  method=args.method if table.greedy is not None else "uniform",
                  prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, runs=args.runs,
                  copy_bandwidth_GBps=bandwidth / 1e9 if bandwidth else None, rows=[])
    stem = Path(args.out) if args.out else RESULTS / f"decode_{name}_{args.dtype}"
    variants = [("dense", 0.0)] + [(f"sparse {s:g}", s) for s in sparsities]
    for label, s in tqdm(variants, desc="variants", unit="variant"):
        result["rows"].append(run_variant(model, decode, label, s, table, prompt, args, bandwidth))
        # Written after every variant: an interrupted run keeps what it finished.
        save_json(stem.with_suffix(".json"), result)
    atomic_write_text(stem.with_suffix(".md"), markdown(result))
    plot(result, stem.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    cli(main)
