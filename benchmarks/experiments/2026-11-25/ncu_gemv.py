"""Kernels for Nsight Compute: shipped sparse GEMV (down, o, gate_up) at 0/50% and cuBLAS dense."""
import sys
import torch
from sparse_kernels.gemv import sparse_gemv

torch.manual_seed(0)
dev = torch.device("cuda")
SHAPES = {"down": (14336, (4096,)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336))}
which = sys.argv[1:] or ["down", "o"]
calls = []
for name in which:
    K, splits = SHAPES[name]
    N = sum(splits)
    W = torch.randn(K, N, device=dev, dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
    for s in (0.0, 0.5):
        t = torch.full((len(splits),), float(x.float().abs().quantile(s)) if s else 0.0, device=dev)
        calls.append((name, s, lambda x=x, W=W, t=t, sp=splits: sparse_gemv(x, W, t, sp)))
    calls.append((name, "cublas", lambda x=x, W=W: x @ W))
for _, _, f in calls:
    f(); f()
torch.cuda.synchronize()
torch.cuda.profiler.start()
for name, s, f in calls:
    torch.cuda.nvtx.range_push(f"{name}_{s}")
    f()
    torch.cuda.nvtx.range_pop()
torch.cuda.synchronize()
torch.cuda.profiler.stop()
print([(n, s) for n, s, _ in calls])
