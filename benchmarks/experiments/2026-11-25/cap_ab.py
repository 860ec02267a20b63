"""Counted fused forms with and without the register cap (REGISTERS_PER_SM huge = no cap)."""
import json, os, torch
from sparse_kernels import gemv, pack_weight, projection_input, sparse_linear
torch.manual_seed(0); dev = torch.device("cuda:0")
rows = []
for name, K, splits, form, res in [("qkv", 4096, (4096, 1024, 1024), "norm", False), ("o", 4096, (4096,), "none", True),
                                   ("gate_up", 4096, (14336, 14336), "norm", False), ("down", 14336, (4096,), "none", True)]:
    N = sum(splits)
    pws = [pack_weight(torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02, "bf16", splits) for _ in range(gemv.weight_copies(K * N * 2, dev))]
    x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
    kw = {"norm": dict(norm_weight=torch.rand(K, device=dev, dtype=torch.bfloat16) + 0.5, norm_eps=1e-5), "none": {}}[form]
    xin = projection_input(x, **kw)
    r = torch.randn(1, N, device=dev, dtype=torch.bfloat16) if res else None
    kept = torch.zeros(len(splits), dtype=torch.int64, device=dev)
    for s in (0.0, 0.5):
        t = torch.full((len(splits),), torch.quantile(xin.float().abs().flatten(), s).item() if s else 0.0, device=dev)
        out = {}
        for cap in ("capped", "uncapped", "capped"):
            gemv.REGISTERS_PER_SM = 65536 if cap == "capped" else 10**9
            for form_name, fn in [("plain", lambda pw: sparse_linear(xin, pw, t)), ("fused", lambda pw: sparse_linear(x, pw, t, residual=r, **kw)),
                                  ("fused, counted", lambda pw: sparse_linear(x, pw, t, residual=r, kept=kept, **kw))]:
                out.setdefault(f"{form_name} {cap}", []).append(gemv.time_in_graph([lambda pw=pw: fn(pw) for pw in pws]))
        rows.append(dict(shape=name, sparsity=s, us=out))
        print(name, s, {k: [round(v, 1) for v in vs] for k, vs in out.items()}, flush=True)
gemv.REGISTERS_PER_SM = 65536
json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, command="python benchmarks/experiments/cap_ab.py", rows=rows),
          open(os.environ.get("OUT", ".") + "/cap_ab.json", "w"), indent=1)
