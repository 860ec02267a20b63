"""Diagnose 50% bandwidth: active-row pattern (random / contiguous half / alternate rows) and the
blocked weight layout [N/BN, K, BN] vs row-major [K, N]; shipped configs."""
import importlib.util, json, os, sys
import torch, triton
from scripts.benchmark_gemv import reference, rel_err

spec = importlib.util.spec_from_file_location("gb", "benchmarks/experiments/2026-11-25/gemv_blk.py"); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
SHAPES = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336)), "down": (14336, (4096,))}
CFG = {"qkv": [m.Config(128, 64, 512, 4, False)], "o": [m.Config(128, 64, 512, 4, False), m.Config(128, 64, 256, 4, False)],
       "gate_up": [m.Config(1024, 16, 1024, 8, True), m.Config(128, 64, 2048, 4, False)], "down": [m.Config(128, 64, 1024, 4, False)]}
out = os.environ.get("OUT", ".") + "/sweep8.json"
res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, rows=[])
torch.manual_seed(0)
dev = torch.device("cuda")
def inputs(K, pattern):
    x = torch.randn(1, K, device=dev)
    if pattern == "contig":
        x[:, K // 2:] *= 1e-3
    elif pattern == "alt":
        x[:, 1::2] *= 1e-3
    return x.to(torch.bfloat16)
for name in sys.argv[1:] or list(SHAPES):
    K, splits = SHAPES[name]; N = sum(splits)
    Ws = [torch.randn(K, N, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(m.weight_copies(K * N * 2, dev))]
    x0 = inputs(K, "random")
    cub = m.time_in_graph([lambda W=W: x0 @ W for W in Ws])
    print(f"== {name} cublas {cub:.1f} us", flush=True)
    for cfg in CFG[name]:
        BN = cfg.block_n
        Wbs = [W.reshape(K, N // BN, BN).permute(1, 0, 2).contiguous().reshape(K, N) for W in Ws]
        for pattern, s in [("random", 0.0), ("random", 0.5), ("random", 0.7), ("contig", 0.5), ("alt", 0.5)]:
            x = inputs(K, pattern)
            t = torch.full((len(splits),), torch.quantile(x.float().abs().flatten(), s).item() if s else 0.0, device=dev)
            ref = reference(x, Ws[0].double(), t, splits)
            kept = (x.float().abs() > t[0]).float().mean().item()
            for layout, WW in (("rowmajor", Ws), ("blocked", Wbs)):
                m.BLOCKED = layout == "blocked"
                err = rel_err(m.sparse_gemv(x, WW[0], t, splits, cfg), ref)
                us = m.time_in_graph([lambda W=W: m.sparse_gemv(x, W, t, splits, cfg) for W in WW])
                gbs = (kept * K * N * 2) / us / 1e3
                res["rows"].append(dict(shape=name, config=vars(cfg), pattern=pattern, sparsity=s, kept=kept, layout=layout, us=us, cublas_us=cub, rel_err=err, tbps=gbs))
                print(f"{name:8s} {BN}x{cfg.block_k}r{cfg.rows_per_program}w{cfg.num_warps}{'c' if cfg.compact else ' '} {pattern:6s} s={s:.1f} kept={kept:.3f} {layout:8s} {us:6.1f} us {gbs:5.2f} TB/s x{cub/us:4.2f} err {err:.1e}", flush=True)
            json.dump(res, open(out, "w"), indent=1)
