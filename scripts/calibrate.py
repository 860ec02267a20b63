"""Calibrate uniform TEAL thresholds for a checkpoint and write its thresholds file.

    python -m scripts.calibrate                     # the bundled model -> <its cache dir>/thresholds.json
    python -m scripts.calibrate --checkpoint DIR    # -> DIR/thresholds.json

The text (default: the Python documentation, from scripts/fetch_text.py) is cut into windows
spread evenly over it. At every other grid sparsity the windows run through the model thresholded
at it, each projection's threshold read off the histogram of its input as it arrives; the points
between are interpolated (thresholds/calibration.py). Each finished pass goes to
<out>.calibrate-state.json at once; rerun the same command after an interruption and it resumes
there. The state file is removed when the output is written, atomically.

Only the uniform table is calibrated: the greedy rows (scripts/greedy_search.py) of the file this
one replaces (--out, or else the file the checkpoint uses now, e.g. the shipped one) are kept as
they are. An --out that is not a thresholds file of this checkpoint is replaced only with --force.
"""
import argparse
import hashlib
import sys
import time
from pathlib import Path

import checkpoint
import thresholds
from generate import DTYPES, HelpFormatter, UsageError, cli, dtype_name, load_model, resolve_device
from scripts.common import DATA, text_files, text_windows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", type=Path, help=f"checkpoint dir or model.safetensors (default: the bundled {checkpoint.BUNDLED})")
    p.add_argument("--text", type=Path, default=DATA / "calibration.txt", help="the text to calibrate on")
    p.add_argument("--windows", type=int, default=4, help="number of windows")
    p.add_argument("--window-length", type=int, default=2048, help="tokens per window (capped at the model's maximum)")
    p.add_argument("--skip", type=int, default=thresholds.SKIP, help="first positions of each window left out of the histograms")
    p.add_argument("--stride", type=int, default=2,
                   help="a thresholded pass at every stride-th grid sparsity, the points between interpolated; 1: a pass at each")
    p.add_argument("--batch-size", type=int, default=1, help="windows a forward pass takes")
    p.add_argument("--device", default="cuda" if checkpoint.torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="weights and activations (default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--out", type=Path, help="the thresholds file to write (default: <checkpoint dir>/thresholds.json)")
    p.add_argument("--force", action="store_true", help="replace an --out that is not a thresholds file of this checkpoint")
    args = p.parse_args(argv)
    if args.windows < 1 or args.batch_size < 1 or args.stride < 1 or args.skip < 0:
        raise UsageError("--windows, --batch-size and --stride must be at least 1, --skip at least 0")
    resolve_device(args.device)
    args.text = text_files([args.text], args.text)[0]
    return args


def replaced(out, ckpt, meta, config, force):
    """-> the Thresholds whose greedy rows the new file keeps, or None: out's if it exists (which
    must be a thresholds file of this checkpoint, unless force), else the file the checkpoint uses now."""
    lineage = checkpoint.lineage(meta)
    if out.exists():
        try:
            return thresholds.load(out, fingerprint=lineage, config=config)
        except thresholds.ThresholdsError as e:
            if force:
                return None
            raise UsageError(f"{e}; --force replaces it") from None
    path = thresholds.find_thresholds(ckpt.parent, lineage)
    return thresholds.load(path, fingerprint=lineage, config=config) if path else None


def main(argv=None):
    args = parse_args(argv)
    dtype = dtype_name(args.dtype, args.device)
    model, meta, tokenizer, ckpt = load_model(args.checkpoint, args.device, DTYPES[dtype])
    out = args.out or ckpt.parent / "thresholds.json"
    old = replaced(out, ckpt, meta, model.config, args.force)
    used_before = thresholds.find_thresholds(ckpt.parent, checkpoint.lineage(meta))
    length = min(args.window_length, model.config.block_size)
    ids, windows = text_windows(tokenizer, [args.text], args.windows, length)
    text = args.text.read_text(encoding="utf-8")

    # Everything the thresholds depend on: a state file made with other settings is refused.
    settings = dict(text=args.text.name, text_sha256=hashlib.sha256(text.encode()).hexdigest()[:16], fingerprint=meta["fingerprint"],
                    windows=args.windows, window_length=length, skip=args.skip, batch_size=args.batch_size, dtype=dtype)
    state = Path(f"{out}.calibrate-state.json")
    print(f"Calibrating {meta.get('name', ckpt)} on {args.windows} windows of {length} tokens; "
          f"each finished pass is kept in {state} (rerun to resume)", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        table = thresholds.calibrate(model, windows, skip=args.skip, batch_size=args.batch_size, stride=args.stride,
                                     state_path=state, settings=settings)
    except ValueError as e:
        raise UsageError(str(e)) from None
    seconds = time.perf_counter() - t0
    table.name, table.fingerprint = meta.get("name", ckpt.parent.name), meta["fingerprint"]
    table.calibration = dict(text=args.text.name, text_sha256=settings["text_sha256"], text_tokens=len(ids),
                             **table.calibration, device=args.device, seconds_last_run=round(seconds, 1))
    kept = old is not None and old.greedy is not None
    if kept:
        table.greedy, table.greedy_thresholds, table.greedy_error, table.greedy_search = (
            old.greedy, old.greedy_thresholds, old.greedy_error, old.greedy_search)
    table.save(out)
    state.unlink()
    print(f"{table.name}: thresholds from {table.calibration['tokens']} tokens ({args.windows} windows of {length}, "
          f"first {args.skip} positions left out) in {seconds:.0f} s -> {out}")
    if kept:
        print("kept the greedy rows of the file replaced, as they were searched (on its uniform table; "
              "python -m scripts.greedy_search searches them again on this one)")
    used_now = thresholds.find_thresholds(ckpt.parent, checkpoint.lineage(meta))
    if used_now is not None and used_before is not None and used_now.resolve() != used_before.resolve():
        print(f"generate.py now reads {used_now} for this checkpoint instead of {used_before}; delete {used_now} to go back")
    elif used_now is None or used_now.resolve() != out.resolve():
        print(f"generate.py reads it with --thresholds {out}")


if __name__ == "__main__":
    cli(main)
