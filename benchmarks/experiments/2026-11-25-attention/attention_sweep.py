"""Decode attention: sweep the split plan (programs an SM; MIN_TILES, a knob of the swept version) and warps against SDPA,
with checks, plus a CUDA-graph replay across positions."""
import itertools, json, os, sys, time
import torch, triton
from scripts import benchmark_attention as ba
from sparse_kernels import attention, gemv, decode_attention

OUT = os.environ.get("OUT", "/tmp")
HEADS = {"llama-3-8b": (32, 8, 128), "llama-2-7b": (32, 32, 128), "llama-70b": (64, 8, 128)}
CASES = [(256, 255), (1024, 1023), (4096, 4095), (8192, 8191), (4096, 255), (4096, 2047), (8192, 1023)]
CONFIGS = list(itertools.product([2, 4], [1, 2, 4], [4])) + [(4, 1, 8), (2, 2, 8)]
dev = torch.device("cuda:0")
torch.manual_seed(0)
res = dict(device=torch.cuda.get_device_name(dev), torch=torch.__version__, triton=triton.__version__, rows=[], graph=[])

def setcfg(pps, mt, w):
    attention.PROGRAMS_PER_SM, attention.MIN_TILES, attention.NUM_WARPS = pps, mt, w

# graph replay across positions, every config, llama-3-8b heads, S = 4096
for (pps, mt, w), hname in itertools.product(CONFIGS, ["llama-3-8b", "llama-70b"]):
    setcfg(pps, mt, w)
    n_head, n_kv, D = HEADS[hname]
    S = 4096
    qkv, cos, sin, pos, caches = ba.make_case(n_head, n_kv, D, S, torch.bfloat16, dev, pos=100)
    kc, vc = caches[0]
    attention.warm_up_attention(1, n_head, S, D, dev, n_kv)
    decode_attention(qkv, kc, vc, cos, sin, pos, n_head, n_kv)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = decode_attention(qkv, kc, vc, cos, sin, pos, n_head, n_kv)
    errs = []
    for p in [0, 63, 64, 200, 1000, 2048, 4095]:
        pos.fill_(p)
        g.replay()
        torch.cuda.synchronize()
        ref = ba.reference(qkv, cos, sin, kc, vc, p, n_head, n_kv)
        errs.append((y.double() - ref).abs().max().item())
    res["graph"].append(dict(config=[pps, mt, w], heads=hname, max_abs_err=max(errs), finite=bool(torch.isfinite(y).all())))
    print("graph", pps, mt, w, max(errs), flush=True)

for name, (S, p) in itertools.product(HEADS, CASES):
    n_head, n_kv, D = HEADS[name]
    nbytes = 2 * n_kv * (p + 1) * D * 2
    case = ba.make_case(n_head, n_kv, D, S, torch.bfloat16, dev, copies=gemv.weight_copies(nbytes, dev), pos=p)
    qkv, cos, sin, pos, caches = case
    q = ba.apply_rope(ba.split(qkv, n_head, n_kv, D)[0], (cos[p], sin[p]))
    plain = [lambda kc=kc, vc=vc: ba.sdpa(q, kc, vc, p) for kc, vc in caches]
    sd = {"default": gemv.time_in_graph(plain)}
    for label, backend in ba.BACKENDS.items():
        try:
            sd[label] = gemv.time_in_graph([ba.under(backend, fn) for fn in plain])
        except RuntimeError:
            sd[label] = None
    best = min(v for v in sd.values() if v is not None)
    row = dict(model=name, S=S, pos=p, bytes=nbytes, sdpa=sd, best_sdpa=best, ours={})
    for pps, mt, w in CONFIGS:
        setcfg(pps, mt, w)
        attention.warm_up_attention(1, n_head, S, D, dev, n_kv)
        chk = ba.check(case, n_head, n_kv)
        us = gemv.time_in_graph([lambda kc=kc, vc=vc: decode_attention(qkv, kc, vc, cos, sin, pos, n_head, n_kv) for kc, vc in caches])
        n_splits = attention.split_plan(n_kv, S, dev)
        row["ours"][f"{pps},{mt},{w}"] = dict(us=us, err=chk["max_abs_err"], bitwise=chk["cache_row_bitwise"], splits=n_splits,
                                             live=attention.split_chunk(n_splits, p)[1])
    bestc = min(row["ours"], key=lambda k: row["ours"][k]["us"])
    print(f"{name:11} S={S:5} pos={p:5} sdpa {best:6.1f}  (4,1,4) {row['ours']['4,1,4']['us']:6.1f}  best {bestc} {row['ours'][bestc]['us']:6.1f}  "
          + " ".join(f"{k}:{v['us']:.1f}" for k, v in row["ours"].items()), flush=True)
    res["rows"].append(row)
    json.dump(res, open(f"{OUT}/attn_sweep.json", "w"), indent=1)
errs = [v["err"] for r in res["rows"] for v in r["ours"].values()]
print("max err", max(errs), "all bitwise", all(v["bitwise"] for r in res["rows"] for v in r["ours"].values()))
