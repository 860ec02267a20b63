"""Time chosen sparse-GEMV configs on one shape: the loop of kernel work (predict, change, measure).

    python -m scripts.sweep_gemv --shape 14336:4096 --configs 128x64r1024w4 128x64r1216w4 --out sweep.json
    python -m scripts.sweep_gemv --shape 4096:14336,14336 --configs 1024x16r1024w8c 128x64r4096w4

A config is BLOCK_Nx BLOCK_K r ROWS_PER_PROGRAM w NUM_WARPS, with a trailing c for the compact loop.
Timing is benchmark_gemv's (CUDA-graph replays over weight copies, medians); each row also holds
the number of programs, so grid-shape effects (waves over the SMs) can be read off. Results are
appended to --out as they come, so an interrupted sweep keeps what it measured.
"""
import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

CONFIG = re.compile(r"^(\d+)x(\d+)r(\d+)w(\d+)(c?)$")


def parse_config(text):
    """'128x64r1024w4c' -> gemv.Config(128, 64, 1024, 4, compact=True)."""
    from sparse_kernels.gemv import Config

    m = CONFIG.match(text)
    if m is None:
        raise ValueError(f"config {text!r} is not BLOCK_NxBLOCK_KrROWSwWARPS[c], e.g. 128x64r1024w4")
    block_n, block_k, rows, warps = (int(g) for g in m.groups()[:4])
    if rows % block_k:
        raise ValueError(f"config {text!r}: rows per program must be a multiple of BLOCK_K")
    return Config(block_n, block_k, rows, warps, m.group(5) == "c")


def parse_shape(text):
    """'4096:14336,14336' -> (4096, (14336, 14336))."""
    k, _, splits = text.partition(":")
    return int(k), tuple(int(s) for s in splits.split(","))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", required=True, help="IN:OUT[,OUT2[,OUT3]] (segments as the fused projections have them)")
    p.add_argument("--configs", nargs="+", required=True)
    p.add_argument("--sparsities", default="0,0.5")
    p.add_argument("--out", required=True, help="JSON file the rows are written to")
    args = p.parse_args(argv)
    K, splits = parse_shape(args.shape)
    configs = [parse_config(c) for c in args.configs]
    if not torch.cuda.is_available():
        raise SystemExit("error: the sweep times kernels on a CUDA GPU; none is available")

    import triton

    from scripts.benchmark_gemv import reference, rel_err
    from sparse_kernels import gemv

    torch.manual_seed(0)
    N, dtype, device = sum(splits), torch.bfloat16, torch.device("cuda:0")
    x = torch.randn(1, K, device=device, dtype=dtype)
    Ws = [torch.randn(K, N, device=device, dtype=dtype) * 0.02 for _ in range(gemv.weight_copies(K * N * 2, device))]
    cublas = gemv.time_in_graph([lambda W=W: x @ W for W in Ws])
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  command="python -m scripts.sweep_gemv " + " ".join(sys.argv[1:] if argv is None else argv),
                  shape=[K, list(splits)], sms=sms, cublas_packed_layout_us=cublas, rows=[])
    for cfg in tqdm(configs, desc="configs"):
        n_blocks = sum(triton.cdiv(w, cfg.block_n) for w in splits)
        for s in (float(v) for v in args.sparsities.split(",")):
            t = torch.full((len(splits),), torch.quantile(x.float().abs().flatten(), s).item() if s > 0 else 0.0, device=device)
            err = rel_err(gemv.sparse_gemv(x, Ws[0], t, splits, cfg), reference(x, Ws[0].double(), t, splits))
            us = gemv.time_in_graph([lambda W=W: gemv.sparse_gemv(x, W, t, splits, cfg) for W in Ws])
            result["rows"].append(dict(config=vars(cfg), sparsity=s, us=us, programs=n_blocks * triton.cdiv(K, cfg.rows_per_program),
                                       rel_err=err))
            print(f"{cfg}  s={s:.2f}  {us:7.1f} us  programs {result['rows'][-1]['programs']}  err {err:.1e}", flush=True)
        tmp = Path(f"{args.out}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.out)


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
