"""The Triton decode-attention kernel against a float64 reference, on the CPU through the Triton
interpreter (TRITON_INTERPRET=1 for this module only, as in test_sparse_kernels.py).

A program holds all q heads of one kv head (its group) as rows of a tile of at least 16: the shapes
cover groups of 1, 2, 3 and 4 (padding rows in each), batches above 1, one split and several, and
positions 0, mid-cache and the last slot.

Tolerances (relative Frobenius error of y vs float64): fp32 1e-5; bf16 and fp16 1e-2. The
interpreter rounds fp32 -> bf16 toward zero (the GPU, like torch, to nearest), so the reference's
bf16 rope rounds toward zero too: the cache row the kernel writes is then bitwise the reference's in
every dtype, and y's bf16 error is up to ~5e-3, ~1e-3 of it from p rounded (toward zero) to bf16
for the p.v product as on the GPU (against torch's rounding it would be up to ~1e-2, nearly all of it
from q's rope rounding the other way).
"""
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, interpreted, random_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 1e-2}
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.fixture(scope="module", autouse=True)
def attention():
    yield from interpreted("attention", "_decode_attention_kernel")


@pytest.fixture
def small_tiles(attention, monkeypatch):
    """8-position tiles and 32 programs: several splits of one or more tiles even at small S."""
    monkeypatch.setattr(attention, "BLOCK_T", 8)
    monkeypatch.setattr(attention, "PROGRAMS_PER_SM", 2)
    monkeypatch.setattr(attention, "sm_count", lambda device: 16)
    return attention


def rd(x, dtype):
    """fp32 -> dtype as the kernel rounds: to nearest, but bf16 toward zero on the CPU (the
    interpreter drops the bits)."""
    if dtype == torch.bfloat16 and x.device.type == "cpu":
        return (x.view(torch.int32) & -65536).view(torch.float32).to(dtype)  # exact: low bits are zero
    return x.to(dtype)


def rope(x, cos, sin):
    """The model's rope in x's dtype, rounded after each elementwise op as eager torch does."""
    x1, x2 = x.float().chunk(2, dim=-1)
    a = rd(x.float() * cos.float(), x.dtype).float()
    b = rd(torch.cat([-x2, x1], dim=-1) * sin.float(), x.dtype).float()
    return rd(a + b, x.dtype)


def reference(qkv, k_cache, v_cache, cos, sin, pos, n_head, n_kv_head):
    """-> (y float64 [B, n_head * D], k_cache and v_cache as the call must leave them); cos, sin: tables."""
    B, _, S, D = k_cache.shape
    cos, sin = cos[pos], sin[pos]
    q, k, v = qkv.view(B, n_head + 2 * n_kv_head, D).split([n_head, n_kv_head, n_kv_head], dim=1)
    k_after, v_after = k_cache.clone(), v_cache.clone()
    k_after[:, :, pos], v_after[:, :, pos] = rope(k, cos, sin), v
    group = n_head // n_kv_head
    K = k_after[:, :, :pos + 1].double().repeat_interleave(group, dim=1)  # [B, n_head, pos + 1, D]
    V = v_after[:, :, :pos + 1].double().repeat_interleave(group, dim=1)
    scores = torch.einsum("bhd,bhtd->bht", rope(q, cos, sin).double(), K) / math.sqrt(D)
    y = torch.einsum("bht,bhtd->bhd", scores.softmax(dim=-1), V)
    return y.reshape(B, n_head * D), k_after, v_after


def inputs(B, n_head, n_kv_head, S, D, pos, dtype):
    """Random q|k|v, caches, rotary tables [S + 1, D]; every cache slot from pos on is NaN (slot pos
    included: the new token must come from qkv, not the cache)."""
    qkv = torch.randn(B, (n_head + 2 * n_kv_head) * D).to(dtype)
    k_cache, v_cache = (torch.randn(B, n_kv_head, S, D).to(dtype) for _ in range(2))
    k_cache[:, :, pos:], v_cache[:, :, pos:] = math.nan, math.nan
    angle = torch.outer(torch.arange(S + 1, dtype=torch.float64), 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D))
    angle = torch.cat([angle, angle], dim=1)
    return qkv, k_cache, v_cache, angle.cos().to(dtype), angle.sin().to(dtype)


def bits(t):
    return t.view(BITS[t.dtype])


def run_and_check(att, B, heads, S, D, pos, fmt, device="cpu"):
    n_head, n_kv_head = heads
    dtype, device = DTYPES[fmt], torch.device(device)
    torch.manual_seed(S + pos)
    qkv, k_cache, v_cache, cos, sin = (t.to(device) for t in inputs(B, n_head, n_kv_head, S, D, pos, dtype))
    ref, k_after, v_after = reference(qkv, k_cache, v_cache, cos, sin, pos, n_head, n_kv_head)
    att.warm_up_attention(B, n_head, S, D, device)  # the call below then keeps these buffers
    partials, counters = att.workspace.get(device, partials=1, counters=1)
    partials.fill_(math.nan)  # a partial read before it is written fails
    # y's rows, then one more: a padding row stored past the last q head would land there.
    poisoned = torch.full((B + 1, n_head * D), math.nan, dtype=dtype, device=device)
    out = poisoned[:B]
    pos_t = torch.tensor([pos], dtype=torch.int32 if pos % 2 else torch.int64, device=device)
    y = att.decode_attention(qkv, k_cache, v_cache, cos, sin, pos_t, n_head, n_kv_head, out=out)

    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < TOLERANCE[fmt], err
    assert poisoned[B].isnan().all(), "nothing stored past y"
    used = att.attention_workspace_sizes(B, n_head, S, D, device, n_kv_head)["partials"]
    assert partials[used:].isnan().all(), "nothing stored past the partials these shapes need"
    assert (counters == 0).all(), "the last program of each kv head resets its counter"
    # Every slot but pos unchanged (NaN included), bitwise.
    others = torch.arange(S, device=device) != pos
    assert torch.equal(bits(k_cache[:, :, others]), bits(k_after[:, :, others]))
    assert torch.equal(bits(v_cache[:, :, others]), bits(v_after[:, :, others]))
    assert torch.equal(bits(v_cache[:, :, pos]), bits(v_after[:, :, pos]))
    assert torch.equal(bits(k_cache[:, :, pos]), bits(k_after[:, :, pos]))

    again = att.decode_attention(qkv, k_cache, v_cache, cos, sin, pos_t, n_head, n_kv_head)
    assert torch.equal(bits(again), bits(y)), "two calls give bitwise equal y"


@pytest.mark.parametrize("fmt", DTYPES)
@pytest.mark.parametrize("B,heads,D,S", [(1, (4, 2), 16, 37), (3, (3, 1), 64, 37), (1, (4, 4), 64, 100),
                                         (3, (4, 2), 16, 37), (1, (3, 1), 16, 100)])
def test_matches_float64(small_tiles, B, heads, D, S, fmt):
    for pos in [0, S // 2, S - 1]:
        run_and_check(small_tiles, B, heads, S, D, pos, fmt)


@pytest.mark.parametrize("B,heads,D,S", [(2, (2, 2), 16, 37), (2, (8, 2), 16, 37), (2, (6, 2), 32, 50)])
def test_groups_match_float64(small_tiles, B, heads, D, S):
    """More group sizes (1, 4, and 3) with two sequences, in bf16 only: the rows' indexing does not
    depend on the dtype, and the interpreter is slow."""
    for pos in [0, S // 2, S - 1]:
        run_and_check(small_tiles, B, heads, S, D, pos, "bf16")


@pytest.mark.parametrize("at_once", [0, 1 << 20])
def test_both_combines_match_float64(small_tiles, monkeypatch, at_once):
    """The combine in rounds of one split each (online softmax across rounds) and in one round."""
    monkeypatch.setattr(small_tiles, "COMBINE_AT_ONCE", at_once)
    for pos in [0, 36]:
        run_and_check(small_tiles, 2, (6, 2), 37, 16, pos, "bf16")


def test_split_plan(small_tiles):
    """The grid's splits depend on kv heads and S, never on pos; the device splits 0..pos into live
    splits of whole tiles. The shapes above cover several live splits of one or more tiles, the last
    one short, one live split of several (no combine), and splits past live that exit."""
    cpu = torch.device("cpu")
    assert small_tiles.split_plan(2, 37, cpu) == 5
    assert small_tiles.split_chunk(5, 36) == (8, 5)  # the last [32, 37)
    assert small_tiles.split_chunk(5, 0) == (8, 1)
    assert small_tiles.split_plan(4, 100, cpu) == 8
    assert small_tiles.split_chunk(8, 99) == (16, 7)  # 2 tiles a split, the last [96, 100)
    assert small_tiles.split_chunk(8, 50) == (8, 7)  # the last [48, 51)
    assert small_tiles.split_plan(1, 100, cpu) == 13
    assert small_tiles.split_plan(12, 37, cpu) == 3
    assert small_tiles.split_chunk(3, 36) == (16, 3)  # the last [32, 37)


def test_short_context_in_a_long_cache(small_tiles):
    """A chat's start: the grid has many splits, the first few live; one tile runs alone, with no
    combine, while the grid's other programs exit."""
    assert small_tiles.split_plan(1, 100, torch.device("cpu")) == 13
    assert small_tiles.split_chunk(13, 7) == (8, 1)
    assert small_tiles.split_chunk(13, 20) == (8, 3)  # the last [16, 21)
    for pos in [0, 7, 8, 20, 99]:
        run_and_check(small_tiles, 1, (4, 1), 100, 16, pos, "bf16")


@pytest.mark.parametrize("B,heads,S,D,n_splits", [(3, (4, 2), 37, 16, 1), (1, (3, 1), 100, 16, 2), (1, (4, 4), 100, 64, 1),
                                                  (2, (6, 2), 37, 16, 1)])
def test_default_plan(attention, B, heads, S, D, n_splits):
    """The plan as shipped (BLOCK_T positions a tile, 2 'SMs' on the CPU): one split, or two."""
    assert attention.split_plan(B * heads[1], S, torch.device("cpu")) == n_splits
    for pos in [0, S - 1]:
        run_and_check(attention, B, heads, S, D, pos, "bf16")


def test_workspace_sizes(small_tiles):
    cpu = torch.device("cpu")
    # 36 q heads of 18 floats a split: 1 split over 36 kv heads, 4 over 9 (split_plan(9, 37) == 4).
    assert small_tiles.attention_workspace_sizes(3, 12, 37, 16, cpu, 12) == {"partials": 36 * 1 * 18, "counters": 36}
    assert small_tiles.attention_workspace_sizes(3, 12, 37, 16, cpu, 3) == {"partials": 36 * 4 * 18, "counters": 9}
    # Without n_kv_head: the splits of one kv head a sequence (5) and a counter a q head.
    bound = small_tiles.attention_workspace_sizes(3, 12, 37, 16, cpu)
    assert bound == {"partials": 36 * 5 * 18, "counters": 36}
    small_tiles.warm_up_attention(3, 12, 37, 16, "cpu")
    partials, counters = small_tiles.workspace.get(cpu, partials=1, counters=1)
    assert partials.numel() >= bound["partials"] and counters.numel() >= bound["counters"]


@pytest.mark.parametrize("sms", [2, 132])
def test_warm_up_bounds_every_kv_head_count(attention, monkeypatch, sms):
    """The model warms up knowing n_head only, and inside a CUDA graph the workspace cannot grow:
    that size must cover every n_kv_head dividing n_head (shipped tiles; the CPU's 2 'SMs', an H100's 132)."""
    monkeypatch.setattr(attention, "sm_count", lambda device: sms)
    cpu = torch.device("cpu")
    for B, n_head, S in [(1, 12, 37), (3, 12, 300), (1, 32, 8192), (16, 32, 8192), (64, 32, 4096)]:
        bound = attention.attention_workspace_sizes(B, n_head, S, 128, cpu)
        for n_kv_head in (k for k in range(1, n_head + 1) if n_head % k == 0):
            exact = attention.attention_workspace_sizes(B, n_head, S, 128, cpu, n_kv_head)
            assert all(exact[kind] <= bound[kind] for kind in bound), (B, n_head, S, n_kv_head, exact, bound)


def test_rejects_bad_shapes(attention):
    qkv, k_cache, v_cache, cos, sin = inputs(1, 4, 2, 8, 16, 0, torch.float32)
    pos = torch.tensor([0])
    with pytest.raises(ValueError):
        attention.decode_attention(qkv, k_cache, v_cache, cos, sin, pos, 4, 1)  # caches hold 2 kv heads
    with pytest.raises(ValueError):
        attention.decode_attention(qkv[:, :-1], k_cache, v_cache, cos, sin, pos, 4, 2)
    with pytest.raises(ValueError):
        attention.decode_attention(qkv.half(), k_cache, v_cache, cos, sin, pos, 4, 2)
    with pytest.raises(ValueError):
        attention.decode_attention(qkv, k_cache, v_cache, cos, sin, pos.float(), 4, 2)
    odd = torch.zeros(1, 2, 8, 12)
    with pytest.raises(ValueError):
        attention.decode_attention(torch.zeros(1, 96), odd, odd, cos[:, :12], sin[:, :12], pos, 4, 2)
    narrow = torch.zeros(1, 2, 8, 8)  # a power of two, but under tl.dot's 16
    with pytest.raises(ValueError):
        attention.decode_attention(torch.zeros(1, 64), narrow, narrow, cos[:, :8], sin[:, :8], pos, 4, 2)
    with pytest.raises(ValueError):
        attention.decode_attention(qkv, k_cache, v_cache, cos[0], sin[0], pos, 4, 2)  # a row, not the tables


def decode_logits(model, steps, sparse):
    """Prefill [3, 1, 4, 1, 5], then `steps` one-token steps; -> the steps' logits."""
    model.setup_caches(1, 16)
    model(torch.tensor([[3, 1, 4, 1, 5]]), torch.arange(5), sparse=False)
    out = []
    for i in range(steps):
        out.append(model(torch.tensor([[7 + i]]), torch.tensor([5 + i]), sparse=sparse))
    return torch.cat(out)


@pytest.mark.parametrize("sparse", [False, True])
def test_model_decode_step_through_the_kernel(attention, monkeypatch, sparse):
    """The model's decode step sends attention to the kernel where Triton runs, and gets what its
    torch code (rope, cache write, SDPA) gets; its cache afterwards holds the same rows."""
    model = random_model("tiny")
    model.set_thresholds(torch.full((model.config.n_layer, 7), 0.3))
    calls = []
    launch = attention.decode_attention
    monkeypatch.setattr(attention, "decode_attention", lambda *a, **k: calls.append(1) or launch(*a, **k))
    kernel = decode_logits(model, 3, sparse)
    caches = [(layer.attention.kv_cache.k.clone(), layer.attention.kv_cache.v.clone()) for layer in model.layers]
    assert len(calls) == 3 * model.config.n_layer
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch_path = decode_logits(model, 3, sparse)
    assert len(calls) == 3 * model.config.n_layer, "plain CPU runs the model's torch code"
    torch.testing.assert_close(kernel, torch_path, rtol=1e-4, atol=1e-4)
    for (k, v), layer in zip(caches, model.layers):
        torch.testing.assert_close(k, layer.attention.kv_cache.k, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, layer.attention.kv_cache.v, rtol=1e-5, atol=1e-6)


def test_decode_attention_op_compiles_once(attention):
    """The custom op traces whole under fullgraph, mutates the caches as eager does, and a new
    position (a tensor) reuses the graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from sparse_kernels import decode_attention

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    B, n_head, n_kv, S, D = 1, 4, 2, 20, 16
    caches = [torch.randn(B, n_kv, S, D) for _ in range(4)]  # compiled k, v, eager k, v

    @torch.compile(backend=counter, fullgraph=True)
    def step(qkv, k, v, cos, sin, pos):
        return decode_attention(qkv, k, v, cos, sin, pos, n_head, n_kv) * 2

    caches[2].copy_(caches[0])
    caches[3].copy_(caches[1])
    for p in (3, 11, 19):
        qkv, cos, sin = torch.randn(B, (n_head + 2 * n_kv) * D), torch.randn(S, D), torch.randn(S, D)
        pos = torch.tensor([p])
        got = step(qkv, caches[0], caches[1], cos, sin, pos)
        want = decode_attention(qkv, caches[2], caches[3], cos, sin, pos, n_head, n_kv) * 2
        torch.testing.assert_close(got, want)
        assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert counter.frame_count == 1
    torch.library.opcheck(torch.ops.teal.decode_attention.default,
                          (qkv, caches[0], caches[1], cos, sin, pos, n_head, n_kv))


def test_benchmark_check_on_the_cpu(attention):
    """scripts/benchmark_attention's case, float64 reference and SDPA call, in fp32 through the
    interpreter: the kernel's cache row is bitwise eager rope's, and both errors are tiny."""
    from scripts.benchmark_attention import check, make_case

    torch.manual_seed(0)
    for n_head, n_kv_head, pos in [(4, 1, None), (4, 4, None), (6, 2, None), (4, 1, 10)]:
        got = check(make_case(n_head, n_kv_head, 16, 40, torch.float32, "cpu", pos=pos), n_head, n_kv_head)
        assert got["cache_row_bitwise"] and got["max_abs_err"] < 1e-5 and got["sdpa_max_abs_err"] < 1e-5, got


def test_benchmark_refuses_without_cuda(tmp_path):
    out = tmp_path / "attention.json"
    done = subprocess.run([sys.executable, "-m", "scripts.benchmark_attention", "--out", str(out)], cwd=REPO,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True)
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error:") and not out.exists()
