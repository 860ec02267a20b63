"""The sparse GEMV's fused decode forms against the plain kernel on Llama-3-8B shapes (CUDA).

    python -m scripts.benchmark_fused_gemv --out benchmarks/results/fused_gemv_h100.json

For each projection of a decode step, with the form the model would give it: the plain kernel on
an input made beforehand; the fused call (prologue and residual in the launch); the fused call
that also counts the kept inputs (generate.py's decode step, which reports the measured sparsity);
each part alone; and the unfused ops (torch prologue, plain kernel, torch add). CUDA-graph timing over weight
copies (sparse_kernels.gemv.time_in_graph), each form timed twice, in opposite orders.
"""
import argparse
import json
import os
import sys

import torch
import triton

from sparse_kernels import gemv, pack_weight, projection_input, sparse_linear

SHAPES = [("qkv", 4096, (4096, 1024, 1024), "norm", False), ("o", 4096, (4096,), "none", True),
          ("gate_up", 4096, (14336, 14336), "norm", False), ("down", 14336, (4096,), "swiglu", True)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark times kernels on a CUDA GPU; none is available")
    torch.manual_seed(0)
    dev = torch.device("cuda:0")
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  command="python -m scripts.benchmark_fused_gemv " + " ".join(sys.argv[1:]), rows=[])
    for name, K, splits, form, res in SHAPES:
        N = sum(splits)
        pws = [pack_weight(torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02, "bf16", splits)
               for _ in range(gemv.weight_copies(K * N * 2, dev))]
        x = torch.randn(1, 2 * K if form == "swiglu" else K, device=dev, dtype=torch.bfloat16)
        kw = {"norm": dict(norm_weight=torch.rand(K, device=dev, dtype=torch.bfloat16) + 0.5, norm_eps=1e-5),
              "swiglu": dict(swiglu=True), "none": {}}[form]
        xin = projection_input(x, **kw)
        r = torch.randn(1, N, device=dev, dtype=torch.bfloat16) if res else None
        kept = torch.zeros(len(splits), dtype=torch.int64, device=dev)
        for s in (0.0, 0.5):
            t = torch.full((len(splits),), torch.quantile(xin.float().abs().flatten(), s).item() if s else 0.0, device=dev)
            fns = {"plain": [lambda pw=pw: sparse_linear(xin, pw, t) for pw in pws],
                   "fused": [lambda pw=pw: sparse_linear(x, pw, t, residual=r, **kw) for pw in pws],
                   "fused, counted": [lambda pw=pw: sparse_linear(x, pw, t, residual=r, kept=kept, **kw) for pw in pws],
                   "prologue only": [lambda pw=pw: sparse_linear(x, pw, t, **kw) for pw in pws],
                   "residual only": [lambda pw=pw: sparse_linear(xin, pw, t, residual=r) for pw in pws],
                   "unfused ops": [lambda pw=pw: (lambda y: y if r is None else r + y)(sparse_linear(projection_input(x, **kw), pw, t))
                                   for pw in pws]}
            times = {k: [] for k in fns}
            for order in (list(fns), list(fns)[::-1]):
                for k in order:
                    times[k].append(gemv.time_in_graph(fns[k]))
            result["rows"].append(dict(shape=name, in_features=K, splits=list(splits), prologue=form, residual=res, sparsity=s, us=times))
            print(f"{name:8} {form:7} res={res:d} s={s:.1f}  " + "  ".join(f"{k} {v[0]:5.1f}/{v[1]:5.1f}" for k, v in times.items()), flush=True)
    tmp = f"{args.out}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
