"""Accuracy report: perplexity under uniform and greedy thresholds on held-out prose.

    python -m scripts.accuracy_report               # the bundled model -> benchmarks/results/

The TEAL paper's protocol (thresholds.perplexity, as scripts/eval_ppl.py): windows of C tokens
(2048 where the model allows) spread over the text, the first C - E a dense context, the last
E = 512 thresholded and scored; every setting sees the same windows and the same prefill. Next
to each perplexity, the model-wide sparsity measured while scoring (weight-weighted).

Writes accuracy_<name>.json, .md (the table) and .png (perplexity against sparsity).
"""
import argparse
import hashlib
import time
from pathlib import Path

import torch

import thresholds
from checkpoint import atomic_write_text
from generate import DTYPES, UsageError, cli, dtype_name, find_table, load_model, resolve_device
from model import PROJECTIONS
from scripts.common import DATA, scored_windows, RESULTS, environment, save_figure, save_json, shown, text_files, text_windows

METHODS = ("uniform", "greedy")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="checkpoint dir or model.safetensors (default: the bundled model)")
    p.add_argument("--thresholds", type=Path, help="thresholds file with greedy rows (default: the one that goes with the checkpoint)")
    p.add_argument("--text", type=Path, nargs="+", help="held-out text files, not used for calibration (default: data/heldout/*.txt)")
    p.add_argument("--sparsities", default="0.25,0.4,0.5,0.6,0.7", help="comma-separated, each in (0, 0.9]; dense is always included")
    p.add_argument("--windows", type=int, default=8, help="number of windows")
    p.add_argument("--window-length", type=int, default=2048, help="C (capped at the model's maximum)")
    p.add_argument("--scored", type=int, help="E: the thresholded, scored tokens at each window's end "
                   "(default: 512, or a quarter of the window where that is shorter than 2048)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    try:
        args.sparsities = [float(s) for s in args.sparsities.split(",")]
    except ValueError:
        raise UsageError(f"--sparsities expects comma-separated numbers, got {args.sparsities!r}") from None
    if any(not 0 < s <= 0.9 for s in args.sparsities):
        raise UsageError(f"--sparsities must each be in (0, 0.9], got {args.sparsities}")
    if args.windows < 1 or (args.scored is not None and args.scored < 1):
        raise UsageError("--windows and --scored must be at least 1")
    resolve_device(args.device)
    args.text = text_files(args.text, DATA / "heldout")
    return args


def markdown(doc):
    """The report's table: one line per sparsity, uniform and greedy side by side."""
    dense = doc["dense"]["ppl"]
    by = {(r["method"], r["sparsity"]): r for r in doc["results"]}
    lines = [f"Perplexity of {doc['checkpoint']} on {', '.join(doc['text'])} ({doc['windows']} windows of {doc['window_length']} tokens, "
             f"last {doc['scored']} thresholded and scored; {doc['dtype']} on {doc['device']}). Measured: the model-wide sparsity "
             "while scoring, each projection weighted by its weight count.", "",
             "| sparsity | uniform ppl | vs dense | measured | greedy ppl | vs dense | measured |",
             "|---:|---:|---:|---:|---:|---:|---:|",
             f"| 0 (dense) | {dense:.2f} | | {doc['dense']['measured']:.3f} | {dense:.2f} | | {doc['dense']['measured']:.3f} |"]
    for s in doc["sparsities"]:
        cells = []
        for m in METHODS:
            r = by[(m, s)]
            cells += [f"{r['ppl']:.2f}", f"{100 * (r['ppl'] / dense - 1):+.1f}%", f"{r['measured']:.3f}"]
        lines.append(f"| {s:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(doc, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    dense = doc["dense"]
    for m, marker in zip(METHODS, "os"):
        rows = [dense] + [r for r in doc["results"] if r["method"] == m]
        ax.plot([r["measured"] for r in rows], [r["ppl"] for r in rows], marker=marker, label=m)
    ax.axhline(dense["ppl"], color="gray", lw=0.8, ls="--", label=f"dense ({dense['ppl']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("measured model-wide sparsity")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"{doc['checkpoint']}: held-out {doc['tokens_scored']} tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(path, fig)


def main(argv=None):
    args = parse_args(argv)
    dtype = dtype_name(args.dtype, args.device)
    model, meta, tokenizer, ckpt = load_model(args.checkpoint, args.device, DTYPES[dtype])
    table, path = find_table(meta, ckpt, args.thresholds, model.config)
    if table.greedy is None:
        raise UsageError(f"{path} has no greedy rows (add them with python -m scripts.greedy_search)")
    C, args.scored = scored_windows(args.window_length, args.scored, model.config.block_size)
    ids, windows = text_windows(tokenizer, args.text, args.windows, C + 1)  # + 1: the last position's label

    n_layer = model.config.n_layer
    runs = [("dense", 0.0)] + [(m, s) for m in METHODS for s in args.sparsities]
    settings = [torch.zeros(n_layer, len(PROJECTIONS)) if m == "dense" else table.at(s, m) for m, s in runs]
    t0 = time.perf_counter()
    results = thresholds.perplexity(model, windows, settings, scored=args.scored)
    seconds = time.perf_counter() - t0

    sizes = model.projection_sizes()
    rows = [dict(method=m, sparsity=s, ppl=r["ppl"], nll=r["nll"], measured=thresholds.model_wide(r["measured"], sizes),
                 measured_per_projection={p: round(v, 5) for p, v in zip(PROJECTIONS, r["measured"].mean(0).tolist())})
            for (m, s), r in zip(runs, results)]
    name = meta.get("name", ckpt.parent.name)
    # The command, the environment and the thresholds file's hash: what reproduces these figures
    # (rounding decides the entries that sit near a threshold, so the kernels that ran matter).
    doc = dict(**environment(args.device, "accuracy_report", argv), checkpoint=name, fingerprint=meta["fingerprint"], thresholds=shown(path),
               thresholds_sha256=hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16], calibration=table.calibration,
               greedy_search=table.greedy_search, text=[p.name for p in args.text], text_tokens=len(ids), windows=args.windows,
               window_length=C, scored=args.scored, tokens_scored=results[0]["tokens"], dtype=dtype,
               seconds=round(seconds, 1), sparsities=args.sparsities, dense=rows[0], results=rows[1:])
    stem = args.out_dir / f"accuracy_{name}"
    save_json(stem.with_suffix(".json"), doc)
    atomic_write_text(stem.with_suffix(".md"), markdown(doc))
    plot(doc, stem.with_suffix(".png"))
    print(markdown(doc))
    print(f"{seconds:.0f} s; wrote {stem}.json, .md, .png")


if __name__ == "__main__":
    cli(main)
