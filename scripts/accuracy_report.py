"""Accuracy report: perplexity under uniform and greedy thresholds on held-out prose, and by weight format.

    python -m scripts.accuracy_report               # the bundled model -> benchmarks/results/
    python -m scripts.accuracy_report --weights     # every weight format, greedy thresholds
    python -m scripts.accuracy_report --weights bf16 int8 int4-g128 --sparsities 0.25,0.5

The TEAL paper's protocol (thresholds.perplexity, as scripts/eval_ppl.py): windows of C tokens
(2048 where the model allows) spread over the text, the first C - E a dense context, the last
E = 512 thresholded and scored; every setting sees the same windows and the same prefill. Next
to each perplexity, the model-wide sparsity measured while scoring (weight-weighted).

Without --weights: the checkpoint's own weights, uniform and greedy side by side; writes
accuracy_<name>.json, .md (the table) and .png (perplexity against sparsity).

With --weights (the paper's Figure 4, sparsity with quantization): greedy thresholds, dense and
at each sparsity, for each weight format: bf16 (the checkpoint's own float weights, unquantized),
int8, int4-g32, int4-g64, int4-g128 (all five when none is named). The quantized checkpoints are
derived with quantize.py beside the source (DIR-int8, DIR-int4-g128, ...; reused when there) and
use the source's thresholds file unchanged. Every format computes in --dtype (fp32 on the CPU).
Writes accuracy_weights_<name>.json, .md and .png after each format, keeping the cells already
in the JSON: a rerun of the same settings computes only the missing cells, so an interruption
loses at most the format in progress.
"""
import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint
import quantize
import thresholds
from checkpoint import atomic_write_text
from generate import DTYPES, UsageError, cli, dtype_name, find_table, load_model, resolve_device
from model import PROJECTIONS
from scripts.common import DATA, scored_windows, RESULTS, environment, save_figure, save_json, shown, text_files, text_windows
from sparse_kernels import GROUP_SIZES

METHODS = ("uniform", "greedy")
WEIGHTS = ("bf16", "int8", *(f"int4-g{g}" for g in GROUP_SIZES))
# What a weights report's cells must share with the JSON they join (else they measure something else).
SAME = ("fingerprint", "thresholds_sha256", "text", "text_tokens", "windows", "window_length", "scored", "device", "dtype")


def sparsity_list(text):
    try:
        values = [float(s) for s in text.split(",")]
    except ValueError:
        raise UsageError(f"--sparsities expects comma-separated numbers, got {text!r}") from None
    if any(not 0 < s <= 0.9 for s in values):
        raise UsageError(f"--sparsities must each be in (0, 0.9], got {values}")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="checkpoint dir or model.safetensors (default: the bundled model)")
    p.add_argument("--thresholds", type=Path, help="thresholds file with greedy rows (default: the one that goes with the checkpoint)")
    p.add_argument("--text", type=Path, nargs="+", help="held-out text files, not used for calibration (default: data/heldout/*.txt)")
    p.add_argument("--weights", nargs="*", metavar="FORMAT", help=f"the weights report, for these formats ({', '.join(WEIGHTS)}; "
                   "none named: all)")
    p.add_argument("--sparsities", help="comma-separated, each in (0, 0.9]; dense is always included "
                   "(default: 0.25,0.4,0.5,0.6,0.7; with --weights 0.25,0.4,0.5)")
    p.add_argument("--windows", type=int, default=8, help="number of windows")
    p.add_argument("--window-length", type=int, default=2048, help="C (capped at the model's maximum)")
    p.add_argument("--scored", type=int, help="E: the thresholded, scored tokens at each window's end "
                   "(default: 512, or a quarter of the window where that is shorter than 2048)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.sparsities = sparsity_list(args.sparsities or ("0.25,0.4,0.5,0.6,0.7" if args.weights is None else "0.25,0.4,0.5"))
    if args.weights is not None:
        unknown = [w for w in args.weights if w not in WEIGHTS]
        if unknown:
            raise UsageError(f"--weights: unknown format {unknown[0]!r} (choose from {', '.join(WEIGHTS)})")
        args.weights = [w for w in WEIGHTS if w in args.weights] if args.weights else list(WEIGHTS)
    if args.windows < 1 or (args.scored is not None and args.scored < 1):
        raise UsageError("--windows and --scored must be at least 1")
    resolve_device(args.device)
    args.text = text_files(args.text, DATA / "heldout")
    return args


def cell(r, sizes, **keys):
    """One thresholds.perplexity result as a results row: keys, then ppl, nll and the measured sparsity."""
    return dict(**keys, ppl=r["ppl"], nll=r["nll"], measured=thresholds.model_wide(r["measured"], sizes),
                measured_per_projection={p: round(v, 5) for p, v in zip(PROJECTIONS, r["measured"].mean(0).tolist())})


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


def methods_report(args, argv, model, table, windows, header):
    runs = [("dense", 0.0)] + [(m, s) for m in METHODS for s in args.sparsities]
    settings = [torch.zeros(model.config.n_layer, len(PROJECTIONS)) if m == "dense" else table.at(s, m) for m, s in runs]
    t0 = time.perf_counter()
    results = thresholds.perplexity(model, windows, settings, scored=args.scored)
    seconds = time.perf_counter() - t0

    sizes = model.projection_sizes()
    rows = [cell(r, sizes, method=m, sparsity=s) for (m, s), r in zip(runs, results)]
    doc = dict(**environment(args.device, "accuracy_report", argv), **header, seconds=round(seconds, 1), sparsities=args.sparsities,
               dense=rows[0], results=rows[1:])
    stem = args.out_dir / f"accuracy_{header['checkpoint']}"
    save_json(stem.with_suffix(".json"), doc)
    atomic_write_text(stem.with_suffix(".md"), markdown(doc))
    plot(doc, stem.with_suffix(".png"))
    print(markdown(doc))
    print(f"{seconds:.0f} s; wrote {stem}.json, .md, .png")


def weights_markdown(doc):
    """The weights report's table: one line per format, a perplexity and a measured sparsity per sparsity."""
    by = {(r["weights"], r["sparsity"]): r for r in doc["results"]}
    sparsities = sorted({s for _, s in by})
    lines = [f"Perplexity of {doc['checkpoint']} by weight format, greedy thresholds ({doc['thresholds']}, the same for every "
             f"format), on {', '.join(doc['text'])} ({doc['windows']} windows of {doc['window_length']} tokens, last {doc['scored']} "
             f"thresholded and scored). Every format computes in {doc['dtype']} on {doc['device']}: bf16 is the checkpoint's own "
             "float weights, unquantized; int8 has one scale per output channel, int4-gG a scale and a zero per G input channels "
             "(quantize.py, round-to-nearest; lm_head stays float). Each ppl is followed by its change from bf16 at the same "
             "sparsity; measured: the model-wide sparsity while scoring, each projection weighted by its weight count.", "",
             "| weights | " + " | ".join(f"{'dense' if s == 0 else f'{s:g}'} ppl | measured" for s in sparsities) + " |",
             "|---|" + "---:|---:|" * len(sparsities)]
    for w in [w for w in WEIGHTS if any(k == w for k, _ in by)]:
        cells = []
        for s in sparsities:
            r, base = by.get((w, s)), by.get(("bf16", s))
            if r is None:
                cells += ["", ""]
                continue
            change = f" ({100 * (r['ppl'] / base['ppl'] - 1):+.2f}%)" if base and w != "bf16" else ""
            cells += [f"{r['ppl']:.2f}{change}", f"{r['measured']:.3f}"]
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def weights_plot(doc, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for w, marker in zip(WEIGHTS, "osD^v"):
        rows = sorted((r for r in doc["results"] if r["weights"] == w), key=lambda r: r["sparsity"])
        if rows:
            ax.plot([r["measured"] for r in rows], [r["ppl"] for r in rows], marker=marker, label=w)
    ax.set_xlabel("measured model-wide sparsity (greedy)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{doc['checkpoint']}: weight formats, held-out {doc['tokens_scored']} tokens")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(path, fig)


def quantized_model(source, weights, args, dtype):
    """-> (model, metadata) of a quantized weight format: the source's quantize.py derivative beside
    it, quantized first where it is not there yet."""
    mode, _, group = weights.partition("-g")
    group_size = int(group) if group else None
    out = source.parent.with_name(source.parent.name + quantize.suffix(mode, group_size))
    quantize.main(["--checkpoint", str(source), "--mode", mode, *(["--group-size", group] if group else []), "--out", str(out),
                   "--device", args.device])
    return checkpoint.load(out / checkpoint.FILE, device=args.device, dtype=DTYPES[dtype])


def weights_report(args, argv, model, meta, ckpt, table, windows, header):
    if checkpoint.quantization_of(meta):
        raise UsageError(f"--weights starts from a float checkpoint; {header['checkpoint']} is quantized ({meta['quantization']})")
    stem = args.out_dir / f"accuracy_weights_{header['checkpoint']}"
    path = stem.with_suffix(".json")
    now = dict(**header, device=args.device)
    kept, formats, seconds = [], {}, 0.0
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            differs = [k for k in SAME if old.get(k) != now[k]]
            kept, formats, seconds = old["results"], old["formats"], old["seconds"]
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{path} is not a weights report ({e}); delete it or choose another --out-dir") from None
        if differs:
            raise UsageError(f"{path} holds cells of other settings ({differs[0]}: {old.get(differs[0])!r}, now "
                             f"{now[differs[0]]!r}); delete it or choose another --out-dir")
    done = {(r["weights"], r["sparsity"]) for r in kept}
    todo = [(w, [s for s in [0.0, *args.sparsities] if (w, s) not in done]) for w in args.weights]
    todo = [(w, ss) for w, ss in todo if ss]
    if done:
        print(f"{path}: {len(done)} cells kept, {sum(len(ss) for _, ss in todo)} to compute")

    def save():
        rows = sorted(kept, key=lambda r: (WEIGHTS.index(r["weights"]), r["sparsity"]))
        doc = dict(**environment(args.device, "accuracy_report", argv), **header, seconds=round(seconds, 1),
                   sparsities=sorted({r["sparsity"] for r in rows}), formats=formats, results=rows)
        save_json(path, doc)
        atomic_write_text(stem.with_suffix(".md"), weights_markdown(doc))
        weights_plot(doc, stem.with_suffix(".png"))
        return doc

    bar = tqdm(total=sum(len(ss) for _, ss in todo), desc="cells", unit="cell")
    for w, ss in todo:
        bar.set_postfix_str(w)
        m, m_meta = (model, meta) if w == "bf16" else quantized_model(ckpt, w, args, header["dtype"])
        settings = [table.at(s, "greedy") if s > 0 else torch.zeros(m.config.n_layer, len(PROJECTIONS)) for s in ss]
        t0 = time.perf_counter()
        results = thresholds.perplexity(m, windows, settings, scored=args.scored)
        seconds += time.perf_counter() - t0
        sizes = m.projection_sizes()
        kept += [cell(r, sizes, weights=w, sparsity=s) for s, r in zip(ss, results)]
        formats[w] = dict(fingerprint=m_meta["fingerprint"], quantization=checkpoint.quantization_of(m_meta))
        save()
        bar.update(len(ss))
    bar.close()
    doc = save()
    print(weights_markdown(doc))
    print(f"{seconds:.0f} s of perplexity in all; wrote {stem}.json, .md, .png")


def main(argv=None):
    args = parse_args(argv)
    dtype = dtype_name(args.dtype, args.device)
    model, meta, tokenizer, ckpt = load_model(args.checkpoint, args.device, DTYPES[dtype])
    table, path = find_table(meta, ckpt, args.thresholds, model.config)
    if table.greedy is None:
        raise UsageError(f"{path} has no greedy rows (add them with python -m scripts.greedy_search)")
    C, args.scored = scored_windows(args.window_length, args.scored, model.config.block_size)
    ids, windows = text_windows(tokenizer, args.text, args.windows, C + 1)  # + 1: the last position's label
    # The command, the environment and the thresholds file's hash: what reproduces these figures
    # (rounding decides the entries that sit near a threshold, so the kernels that ran matter).
    header = dict(checkpoint=meta.get("name", ckpt.parent.name), fingerprint=meta["fingerprint"], thresholds=shown(path),
                  thresholds_sha256=hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16], calibration=table.calibration,
                  greedy_search=table.greedy_search, text=[p.name for p in args.text], text_tokens=len(ids), windows=args.windows,
                  window_length=C, scored=args.scored, tokens_scored=args.windows * args.scored, dtype=dtype)
    if args.weights is None:
        methods_report(args, argv, model, table, windows, header)
    else:
        weights_report(args, argv, model, meta, ckpt, table, windows, header)


if __name__ == "__main__":
    cli(main)
