"""Block-wise greedy sparsities for a checkpoint, added to its thresholds file (version 2).

    python -m scripts.greedy_search                 # the bundled model, its shipped thresholds
    python -m scripts.greedy_search --checkpoint DIR --out DIR/thresholds.json

Reads the checkpoint's uniform thresholds (from scripts/calibrate.py), searches each block's
sparsities on windows of the calibration text (thresholds/greedy.py), and writes the uniform
table with the greedy rows to --out. Each finished block goes to <out>.greedy-state.json at
once; rerun the same command after an interruption and it resumes there. The state file is
removed when the output is written, atomically.
"""
import argparse
import hashlib
import time
from pathlib import Path

import torch

import thresholds
from generate import DTYPES, UsageError, cli, find_table, load_model, resolve_device
from scripts.common import DATA, text_files, text_windows
from thresholds.greedy import STEP, TOP, greedy_search


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="checkpoint dir or model.safetensors (default: the bundled model)")
    p.add_argument("--thresholds", type=Path, help="the uniform thresholds file to start from (default: the one that goes with the checkpoint)")
    p.add_argument("--out", type=Path, help="default: the --thresholds file, rewritten with greedy rows "
                   "(for a file shipped in thresholds/files/: <checkpoint dir>/thresholds.json)")
    p.add_argument("--text", type=Path, default=DATA / "calibration.txt")
    p.add_argument("--windows", type=int, default=16, help="number of windows")
    p.add_argument("--window-length", type=int, default=512, help="tokens per window")
    p.add_argument("--tail", type=int, default=128, help="last positions of each window thresholded and scored, as decode")
    p.add_argument("--step", type=float, default=STEP, help="effective sparsity added per greedy step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # bf16 matmuls are ~5x faster than fp32 on CPUs with AVX512-BF16, and the search mostly ranks
    # errors: q, k, v, gate and up take their thresholds from the (fp32) uniform table; only o's
    # and down's are quantiles of their inputs as computed in this dtype.
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    args = p.parse_args(argv)
    if args.windows < 1 or not 0 < args.tail < args.window_length:
        raise UsageError("--windows must be at least 1, and --tail between 1 and --window-length - 1")
    if not 0 < args.step <= 0.1:
        raise UsageError(f"--step must be in (0, 0.1], got {args.step}")
    resolve_device(args.device)
    args.text = text_files([args.text], args.text)[0]
    return args


def main(argv=None):
    args = parse_args(argv)
    model, meta, tokenizer, ckpt = load_model(args.checkpoint, args.device, DTYPES[args.dtype])
    table, source = find_table(meta, ckpt, args.thresholds, model.config)
    # A shipped file is the repository's: by default the rows go beside the checkpoint instead.
    out = args.out or (ckpt.parent / "thresholds.json" if Path(source).resolve().parent == thresholds.SHIPPED else source)
    length = min(args.window_length, model.config.block_size)
    _, windows = text_windows(tokenizer, [args.text], args.windows, length)
    text = args.text.read_text(encoding="utf-8")

    # Everything the rows depend on: a state file made with other settings is refused.
    settings = dict(text=args.text.name, text_sha256=hashlib.sha256(text.encode()).hexdigest()[:16], fingerprint=meta["fingerprint"],
                    uniform_sha256=hashlib.sha256(table.uniform.numpy().tobytes()).hexdigest()[:16],
                    windows=args.windows, window_length=length, tail=args.tail, step=args.step, top=TOP, dtype=args.dtype)
    state = Path(f"{out}.greedy-state.json")
    t0 = time.perf_counter()
    try:
        rows, row_thresholds, errors = greedy_search(model, windows, table, args.tail, args.step, TOP, state_path=state, settings=settings)
    except ValueError as e:
        raise UsageError(str(e)) from None
    seconds = time.perf_counter() - t0
    table.greedy, table.greedy_thresholds, table.greedy_error = rows, row_thresholds, errors
    table.greedy_search = dict(settings, inputs="dense hidden states", device=args.device, seconds_last_run=round(seconds, 1))
    table.save(out)
    state.unlink()
    print(f"{meta.get('name', ckpt)}: greedy rows for {len(rows)} blocks ({args.windows} windows of {length}, last {args.tail} scored, "
          f"step {args.step}) in {seconds:.0f} s -> {out}")


if __name__ == "__main__":
    cli(main)
