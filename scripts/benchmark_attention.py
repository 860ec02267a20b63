"""Time the one-launch decode attention against torch SDPA on Llama head layouts (CUDA).

    python -m scripts.benchmark_attention                      # JSON to benchmarks/results/attention_<device>.json
    python -m scripts.benchmark_attention --models llama-3-8b --cases 8192:8191 4096:255 --out /tmp/attention.json

One decode step, B = 1, bf16, at position pos of an S-slot cache, for each head layout and case S:pos:
pos = S - 1 (a full cache), and short contexts in the 4096- and 8192-slot caches generate.py's chat
allocates. Ours is
sparse_kernels.decode_attention (the custom op: rope of q and k, the cache write and the split-KV
attention in one launch); SDPA is torch's scaled_dot_product_attention of the same roped q over the
cache sliced to pos + 1 (GQA through enable_gqa, no copy of K and V; q's rope and the cache write
are not timed), by default dispatch and under each backend that takes the call. Timing is
sparse_kernels.tuning.time_in_graph: CUDA-graph replays cycling through enough cache copies (4x the
L2) that each call reads its cache cold, medians. Bandwidth counts the bytes that must be read: K
and V of pos + 1 positions of each kv head. Errors are max abs differences from a float64 reference.
"""
import argparse
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from generate import UsageError, cli
from model import apply_rope
from scripts.common import RESULTS, environment, gpu_tag, save_json
from sparse_kernels import attention, decode_attention
from sparse_kernels.tuning import time_in_graph, weight_copies

HEADS = {"llama-3-8b": (32, 8, 128), "llama-2-7b": (32, 32, 128)}  # n_head, n_kv_head, head_dim
CASES = [(256, 255), (1024, 1023), (4096, 4095), (8192, 8191), (4096, 255), (8192, 1023)]  # (S, pos)
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


def split(qkv, n_head, n_kv_head, D):
    """qkv [B, (n_head + 2 n_kv_head) * D] -> q, k, v as (B, heads, 1, D), the model's layout."""
    q, k, v = qkv.view(qkv.shape[0], n_head + 2 * n_kv_head, D).split([n_head, n_kv_head, n_kv_head], dim=1)
    return q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2)


def make_case(n_head, n_kv_head, D, S, dtype, device, copies=1, pos=None):
    """One decode step at pos (default S - 1): qkv [1, (n_head + 2 n_kv_head) * D], the rotary tables
    (cos, sin: [S, D]), pos ([1] int64) and `copies` cache pairs [1, n_kv_head, S, D] whose slot pos
    already holds the new token's roped k and v: the kernel rewrites the same values, SDPA reads them."""
    pos = S - 1 if pos is None else pos
    qkv = torch.randn(1, (n_head + 2 * n_kv_head) * D, device=device).to(dtype)
    angle = torch.outer(torch.arange(S, dtype=torch.float64), 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D))
    angle = torch.cat([angle, angle], dim=1)
    cos, sin = angle.cos().to(device, dtype), angle.sin().to(device, dtype)
    _, k, v = split(qkv, n_head, n_kv_head, D)
    caches = []
    for _ in range(copies):
        k_cache, v_cache = (torch.randn(1, n_kv_head, S, D, device=device).to(dtype) for _ in range(2))
        k_cache[:, :, pos], v_cache[:, :, pos] = apply_rope(k, (cos[pos], sin[pos]))[:, :, 0], v[:, :, 0]
        caches.append((k_cache, v_cache))
    return qkv, cos, sin, torch.tensor([pos], device=device), caches


def reference(qkv, cos, sin, k_cache, v_cache, pos, n_head, n_kv_head):
    """float64 attention of the q roped at pos over cache slots 0..pos -> [B, n_head * D]."""
    B, _, _, D = k_cache.shape
    q = apply_rope(split(qkv, n_head, n_kv_head, D)[0], (cos[pos], sin[pos])).double()  # (B, n_head, 1, D)
    K = k_cache[:, :, :pos + 1].double().repeat_interleave(n_head // n_kv_head, dim=1)  # (B, n_head, pos + 1, D)
    V = v_cache[:, :, :pos + 1].double().repeat_interleave(n_head // n_kv_head, dim=1)
    y = torch.softmax(q @ K.transpose(-1, -2) / math.sqrt(D), dim=-1) @ V  # (B, n_head, 1, D)
    return y.reshape(B, n_head * D)


def sdpa(q, k_cache, v_cache, pos):
    """torch's attention of the roped q (B, n_head, 1, D) over cache slots 0..pos -> (B, n_head, 1, D)."""
    return F.scaled_dot_product_attention(q, k_cache[:, :, :pos + 1], v_cache[:, :, :pos + 1], enable_gqa=True)


def check(case, n_head, n_kv_head):
    """Ours and SDPA on the case's first cache pair, against float64: max abs errors, and whether
    the kernel's cache row at pos is bitwise the eager rope's."""
    qkv, cos, sin, pos, caches = case
    k_cache, v_cache = caches[0]
    last, D = int(pos), k_cache.shape[3]
    ref = reference(qkv, cos, sin, k_cache, v_cache, last, n_head, n_kv_head)
    row = k_cache[:, :, last].clone()
    y = decode_attention(qkv, k_cache, v_cache, cos, sin, pos, n_head, n_kv_head)
    q = apply_rope(split(qkv, n_head, n_kv_head, D)[0], (cos[last], sin[last]))
    y_sdpa = sdpa(q, k_cache, v_cache, last).reshape(ref.shape)
    return dict(max_abs_err=(y.double() - ref).abs().max().item(), sdpa_max_abs_err=(y_sdpa.double() - ref).abs().max().item(),
                cache_row_bitwise=torch.equal(k_cache[:, :, last], row))


def under(backend, fn):
    """fn with SDPA restricted to one backend (at capture too: the choice is made per call)."""
    def call():
        with sdpa_kernel(backend):
            return fn()
    return call


def run_case(name, S, last, dtype, device):
    """Check, then time ours and SDPA at pos = last of an S-slot cache on the heads of `name` -> the case's row."""
    n_head, n_kv_head, D = HEADS[name]
    needed = 2 * n_kv_head * (last + 1) * D * dtype.itemsize  # K and V of the slots read
    case = make_case(n_head, n_kv_head, D, S, dtype, device, copies=weight_copies(needed, device), pos=last)
    qkv, cos, sin, pos, caches = case
    checked = check(case, n_head, n_kv_head)
    ours = time_in_graph([lambda kc=kc, vc=vc: decode_attention(qkv, kc, vc, cos, sin, pos, n_head, n_kv_head)
                          for kc, vc in caches])
    q = apply_rope(split(qkv, n_head, n_kv_head, D)[0], (cos[last], sin[last]))
    plain = [lambda kc=kc, vc=vc: sdpa(q, kc, vc, last) for kc, vc in caches]
    sdpa_us = {"default": time_in_graph(plain)}
    for label, backend in BACKENDS.items():
        try:
            sdpa_us[label] = time_in_graph([under(backend, fn) for fn in plain])
        except RuntimeError:  # this backend does not take the call (GQA, q length 1, the GPU)
            sdpa_us[label] = None
    best = min(t for t in sdpa_us.values() if t is not None)
    n_splits = attention.split_plan(n_kv_head, S, device)
    chunk, live = attention.split_chunk(n_splits, last)
    return dict(model=name, n_head=n_head, n_kv_head=n_kv_head, head_dim=D, S=S, pos=last, copies=len(caches),
                n_splits=n_splits, chunk=chunk, live_splits=live, programs=n_kv_head * live, bytes=needed, us=ours,
                GBps=needed / ours / 1e3, sdpa_us=sdpa_us, best_sdpa_us=best, best_sdpa_GBps=needed / best / 1e3,
                speedup_vs_best_sdpa=best / ours, **checked)


def table(result):
    """The rows as text: microseconds, GB/s of needed bytes, SDPA by backend ('-': refused the call)."""
    sdpa_cols = ["default", *BACKENDS]
    lines = [f"{result['device_name']}  torch {result['torch']}  triton {result['triton']}  (us; GB/s of needed bytes)",
             f"{'heads':<12}{'S':>6}{'pos':>6}{'MB':>7}{'ours':>8}{'GB/s':>7}" + "".join(f"{k:>10}" for k in sdpa_cols)
             + f"{'vs best':>9}{'err':>9}{'sdpa err':>9}  live/splits"]
    for r in result["rows"]:
        sd = "".join(f"{'-':>10}" if r["sdpa_us"][k] is None else f"{r['sdpa_us'][k]:>10.1f}" for k in sdpa_cols)
        lines.append(f"{r['model']:<12}{r['S']:>6}{r['pos']:>6}{r['bytes'] / 1e6:>7.1f}{r['us']:>8.1f}{r['GBps']:>7.0f}{sd}"
                     + f"{r['speedup_vs_best_sdpa']:>8.2f}x{r['max_abs_err']:>9.1e}{r['sdpa_max_abs_err']:>9.1e}  {r['live_splits']:>4}/{r['n_splits']}"
                     + ("" if r["cache_row_bitwise"] else "  cache row differs from eager rope"))
    return "\n".join(lines)


def case_arg(text):
    """'S:pos' -> (S, pos), 0 <= pos < S."""
    try:
        S, pos = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected S:POS, got {text!r}") from None
    if not 0 <= pos < S:
        raise argparse.ArgumentTypeError(f"pos must lie in [0, S), got {text!r}")
    return S, pos


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(HEADS), choices=list(HEADS))
    p.add_argument("--cases", nargs="+", type=case_arg, default=CASES, metavar="S:POS",
                   help="cache slots S and the position pos < S of the step")
    p.add_argument("--out", help="JSON file (default benchmarks/results/attention_<device>.json)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise UsageError("this benchmark times kernels on a CUDA GPU; none is available")
    device = torch.device("cuda:0")
    out = args.out or RESULTS / f"attention_{gpu_tag(device)}.json"
    torch.manual_seed(0)
    result = dict(**environment(device, "benchmark_attention", argv), sms=torch.cuda.get_device_properties(device).multi_processor_count,
                  dtype="bf16", batch=1, block_t=attention.BLOCK_T, num_warps=attention.NUM_WARPS, num_stages=attention.NUM_STAGES,
                  programs_per_sm=attention.PROGRAMS_PER_SM, rows=[])
    cases = [(m, S, pos) for m in args.models for S, pos in args.cases]
    for model, S, pos in tqdm(cases, desc="cases", unit="case"):
        result["rows"].append(run_case(model, S, pos, torch.bfloat16, device))
        # Written after every case: an interrupted run keeps what it finished.
        save_json(out, result)

    print("\n" + table(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    cli(main)
