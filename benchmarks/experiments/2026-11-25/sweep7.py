"""Sweep shipped vs v7 masked loop over 8B shapes (rotation timing), regs per config."""
import importlib.util, json, os, sys, time
import torch, triton
from scripts.benchmark_gemv import reference, rel_err

def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m

mods = {"base": load("benchmarks/experiments/2026-11-25/gemv_base.py", "gbase"), "v7": load("benchmarks/experiments/2026-11-25/gemv_v7.py", "gv7")}
SHAPES = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336)), "down": (14336, (4096,))}
def C(m, n, k, r, w, c=False): return mods[m].Config(n, k, r, w, c)
R4 = [256, 512, 1024]
PLAN = {
 "qkv": [("base", C("base",128,64,512,4))] + [("v7", C("v7",128,64,r,4)) for r in (256, 320, 512)] + [("v7", C("v7",128,32,r,4)) for r in (192, 256, 512)] + [("v7", C("v7",128,128,r,8)) for r in (768, 1024)],
 "o": [("base", C("base",128,64,512,4))] + [("v7", C("v7",128,64,r,4)) for r in (192, 256, 512)] + [("v7", C("v7",128,32,r,4)) for r in (128, 192, 256)] + [("v7", C("v7",128,128,r,8)) for r in (512, 1024)],
 "gate_up": [("base", C("base",1024,16,1024,8,True)), ("base", C("base",128,64,2048,4))] + [("v7", C("v7",128,64,r,4)) for r in (1024, 1408, 2048)] + [("v7", C("v7",128,32,r,4)) for r in (768, 1024, 2048)] + [("v7", C("v7",128,128,r,8)) for r in (4096,)],
 "down": [("base", C("base",128,64,1024,4))] + [("v7", C("v7",128,64,r,4)) for r in (512, 768, 1024)] + [("v7", C("v7",128,32,r,4)) for r in (448, 512, 768)] + [("v7", C("v7",128,128,r,8)) for r in (1792,)],
}
which = sys.argv[1:] or list(SHAPES)
out = os.environ.get("OUT", ".") + "/sweep7.json"
res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, rows=[])
torch.manual_seed(0)
dev = torch.device("cuda")
for name in which:
    K, splits = SHAPES[name]; N = sum(splits)
    x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
    g = mods["base"]
    Ws = [torch.randn(K, N, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(g.weight_copies(K * N * 2, dev))]
    cub = g.time_in_graph([lambda W=W: x @ W for W in Ws])
    print(f"== {name} cublas {cub:.1f} us", flush=True)
    for s in (0.0, 0.5, 0.7):
        t = torch.full((len(splits),), torch.quantile(x.float().abs().flatten(), s).item() if s else 0.0, device=dev)
        ref = reference(x, Ws[0].double(), t, splits)
        for mname, cfg in PLAN[name]:
            m = mods[mname]
            y = m.sparse_gemv(x, Ws[0], t, splits, cfg)
            err = rel_err(y, ref)
            regs = m.last_kernel.n_regs
            us = m.time_in_graph([lambda W=W: m.sparse_gemv(x, W, t, splits, cfg) for W in Ws])
            progs = sum(triton.cdiv(w, cfg.block_n) for w in splits) * triton.cdiv(K, cfg.rows_per_program)
            res["rows"].append(dict(shape=name, variant=mname, config=vars(cfg), sparsity=s, us=us, cublas_us=cub, regs=regs, programs=progs, rel_err=err))
            print(f"{name:8s} {mname:4s} {cfg.block_n}x{cfg.block_k}r{cfg.rows_per_program}w{cfg.num_warps}{'c' if cfg.compact else ' '} s={s:.1f} {us:6.1f} us  x{cub/us:4.2f}  regs {regs} progs {progs} err {err:.1e}", flush=True)
        json.dump(res, open(out, "w"), indent=1)
