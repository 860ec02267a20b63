"""Perplexity of a checkpoint at several sparsities, by the TEAL paper's protocol.

    python -m scripts.eval_ppl --sparsities 0,0.25,0.5 --windows 8 --out ppl.json
    python -m scripts.eval_ppl --method uniform     # one sparsity for every projection

Windows of C tokens (2048 where the model allows) spread evenly over the text; the first C - E
tokens are a dense context, the last E = 512 are thresholded and scored, as decoded tokens would
be. Every sparsity sees the same windows. Prints a table with the measured sparsity (weighted
by weight count, and per projection) next to each perplexity; --out saves it all as JSON.
"""
import argparse
import time
from pathlib import Path

import torch

import thresholds
from generate import DTYPES, UsageError, cli, dtype_name, find_table, load_model, resolve_device
from model import PROJECTIONS
from scripts.common import DATA, scored_windows, save_json, shown, text_files, text_windows


def sparsity_list(text):
    try:
        values = [float(s) for s in text.split(",")]
    except ValueError:
        raise UsageError(f"--sparsities expects comma-separated numbers, got {text!r}") from None
    if any(not 0 <= s < 1 for s in values):
        raise UsageError(f"--sparsities must each be in [0, 1), got {text}")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="checkpoint dir or model.safetensors (default: the bundled model)")
    p.add_argument("--text", type=Path, nargs="+", help="text files (default: the held-out novels in data/heldout/)")
    p.add_argument("--sparsities", default="0,0.25,0.4,0.5,0.6,0.7", help="comma-separated, each in [0, 1)")
    p.add_argument("--windows", type=int, default=16, help="number of windows")
    p.add_argument("--window-length", type=int, default=2048, help="C (capped at the model's maximum)")
    p.add_argument("--scored", type=int, help="E: the thresholded, scored tokens at each window's end "
                   "(default: 512, or a quarter of the window where that is shorter than 2048)")
    p.add_argument("--method", choices=thresholds.METHODS, default="greedy",
                   help="per-projection sparsities from the file's greedy rows (uniform where it has none), or one for all")
    p.add_argument("--thresholds", type=Path, help="thresholds file (default: the one that goes with the checkpoint)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--out", type=Path, help="JSON file for the results")
    args = p.parse_args(argv)
    args.sparsities = sparsity_list(args.sparsities)
    if args.windows < 1 or (args.scored is not None and args.scored < 1):
        raise UsageError("--windows and --scored must be at least 1")
    resolve_device(args.device)
    args.text = text_files(args.text, DATA / "heldout")
    return args


def table_for(model, meta, ckpt, args):
    """-> (Thresholds or None, its path): None when every sparsity is 0 (dense needs no file)."""
    if not any(args.sparsities):
        return None, None
    table, path = find_table(meta, ckpt, args.thresholds, model.config)
    if max(args.sparsities) > table.grid[-1]:
        raise UsageError(f"sparsity {max(args.sparsities)} is beyond the calibrated grid (up to {table.grid[-1]})")
    return table, path


def print_table(rows):
    dense = rows[0]["ppl"] if rows[0]["sparsity"] == 0 else None
    print(f"{'sparsity':>8} {'ppl':>9} {'vs dense':>8} {'measured':>8}  " + " ".join(f"{p:>5}" for p in PROJECTIONS))
    for r in rows:
        change = f"{100 * (r['ppl'] / dense - 1):+7.1f}%" if dense else f"{'':>8}"
        per_proj = " ".join(f"{r['measured_per_projection'][p]:5.3f}" for p in PROJECTIONS)
        print(f"{r['sparsity']:8.2f} {r['ppl']:9.3f} {change} {r['measured']:8.3f}  {per_proj}")


def main(argv=None):
    args = parse_args(argv)
    dtype = dtype_name(args.dtype, args.device)
    model, meta, tokenizer, ckpt = load_model(args.checkpoint, args.device, DTYPES[dtype])
    table, table_path = table_for(model, meta, ckpt, args)
    C, args.scored = scored_windows(args.window_length, args.scored, model.config.block_size)
    ids, windows = text_windows(tokenizer, args.text, args.windows, C + 1)  # + 1: the last position's label

    # What actually ran: a file without greedy rows serves "greedy" with uniform thresholds.
    method = "greedy" if args.method == "greedy" and table is not None and table.greedy is not None else "uniform"
    n_layer = model.config.n_layer
    settings = [table.at(s, args.method) if s > 0 else torch.zeros(n_layer, len(PROJECTIONS)) for s in args.sparsities]
    t0 = time.perf_counter()
    results = thresholds.perplexity(model, windows, settings, scored=args.scored)
    seconds = time.perf_counter() - t0

    sizes = model.projection_sizes()
    rows = [dict(sparsity=s, ppl=r["ppl"], nll=r["nll"], measured=thresholds.model_wide(r["measured"], sizes),
                 measured_per_projection=dict(zip(PROJECTIONS, r["measured"].mean(0).tolist())),
                 measured_per_layer=[[round(v, 5) for v in row] for row in r["measured"].tolist()])
            for s, r in zip(args.sparsities, results)]
    print(f"{meta.get('name', ckpt)}: {args.windows} windows of {C} tokens, last {args.scored} scored "
          f"({results[0]['tokens']} tokens), {method} thresholds, {dtype} on {args.device}, {seconds:.0f} s")
    print_table(rows)
    if args.out:
        save_json(args.out, dict(
            checkpoint=meta.get("name", str(ckpt)), fingerprint=meta["fingerprint"], method=method,
            thresholds=shown(table_path) if table_path else None, text=[p.name for p in args.text], text_tokens=len(ids),
            windows=args.windows, window_length=C, scored=args.scored, tokens_scored=results[0]["tokens"],
            device=args.device, dtype=dtype, seconds=round(seconds, 1), results=rows))
        print(f"saved {args.out}")


if __name__ == "__main__":
    cli(main)
