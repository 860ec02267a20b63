"""Calibrate uniform TEAL thresholds for a checkpoint and write its thresholds file.

    python -m scripts.calibrate                     # the bundled model, on data/calibration.txt
    python -m scripts.calibrate --checkpoint DIR --out DIR/thresholds.json

The text (default: the Python documentation, from scripts/fetch_text.py) is cut into windows
spread evenly over it; each window runs through the model densely while every projection input's
|x| is histogrammed. The file is written atomically, so an interrupted run leaves no partial file.
"""
import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import torch

import thresholds
from checkpoint import CheckpointError, load as load_checkpoint
from tokenizer import TokenizerError, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = Path(os.environ.get("TEAL_CACHE", Path.home() / ".cache" / "teal")) / "smollm2-135m-instruct"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class UsageError(Exception):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint dir or model.safetensors (default: the bundled model)")
    p.add_argument("--text", type=Path, default=REPO / "data" / "calibration.txt")
    p.add_argument("--windows", type=int, default=64, help="number of windows")
    p.add_argument("--window-length", type=int, default=2048, help="tokens per window (capped at the model's maximum)")
    p.add_argument("--skip", type=int, default=thresholds.SKIP, help="first positions of each window left out")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--out", type=Path, help="default: <checkpoint dir>/thresholds.json")
    args = p.parse_args(argv)
    if args.windows < 1 or args.batch_size < 1 or args.skip < 0:
        raise UsageError("--windows and --batch-size must be at least 1, --skip at least 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} asked for, but no CUDA GPU is available")
    if not args.text.is_file():
        raise UsageError(f"text not found: {args.text} (run python scripts/fetch_text.py)")
    return args


def main(argv=None):
    args = parse_args(argv)
    ckpt = args.checkpoint / "model.safetensors" if args.checkpoint.is_dir() else args.checkpoint
    if not ckpt.is_file():
        raise UsageError(f"checkpoint not found: {ckpt} (convert one with scripts/convert_gguf.py or scripts/convert_hf_checkpoint.py)")
    dtype = DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    model, meta = load_checkpoint(ckpt, device=args.device, dtype=dtype)
    tokenizer = load_tokenizer(ckpt.parent)

    text = args.text.read_text(encoding="utf-8")
    ids = tokenizer.encode(text, bos=tokenizer.add_bos)
    length = min(args.window_length, model.config.block_size)
    try:
        windows = thresholds.token_windows(ids, args.windows, length)
    except ValueError as e:
        raise UsageError(str(e)) from None

    t0 = time.perf_counter()
    table = thresholds.calibrate(model, windows, skip=args.skip, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    table.name, table.fingerprint = meta.get("name", ckpt.parent.name), meta["fingerprint"]
    table.calibration = dict(text=args.text.name, text_sha256=hashlib.sha256(text.encode()).hexdigest()[:16],
                             text_tokens=len(ids), **table.calibration, device=args.device, seconds=round(seconds, 1))
    out = args.out or ckpt.parent / "thresholds.json"
    table.save(out)
    print(f"{table.name}: thresholds from {table.calibration['tokens']} tokens ({args.windows} windows of {length}, "
          f"first {args.skip} positions skipped) in {seconds:.0f} s -> {out}")


def cli(argv=None):
    try:
        main(argv)
    except (UsageError, CheckpointError, TokenizerError, thresholds.ThresholdsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()
