"""The kernels and the compiled decode step on a CUDA GPU, as compiled Triton (never the
interpreter): what the benchmarks check, as tests. On a CUDA machine: python -m pytest -m cuda -q;
without a GPU every test here skips (conftest.py).

The references are the CPU tests' (test_sparse_kernels, test_attention, test_decode), run on the
GPU: float64 products of the thresholded input with the weight the kernel multiplies by
(pw.dequantize()), within the CPU tests' tolerances (relative Frobenius error: fp32 1e-5; bf16, fp16
and the quantized formats, which compute in bf16 here, 1e-2); a NaN in every input, which no
threshold lets through; outputs (the launcher's out=) and the kernels' scratch poisoned with NaN
first. Shapes are small but for Llama-3-8B's four decode projections, which run with the GPU's tuned
configs (gate/up: the compact loop). Shapes repeat across tests so that their kernels compile once.
"""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import generate
import sparse_kernels
from model import ModelArgs, Transformer
from quantize import quantize_model
from scripts.benchmark_attention import check as against_sdpa, make_case
from sparse_kernels import pack_weight, projection_input, sparse_linear
from sparse_kernels.configs import LLAMA_3_8B, Config
from sparse_kernels.ops import MAX_KERNEL_ROWS
from sparse_kernels.reference import count_kept
from sparse_kernels.tuning import launch
from tests.helpers import random_llama, random_model
from tests.test_attention import run_and_check
from tests.test_decode import thresholds_at
from tests.test_sparse_kernels import (TOLERANCE, check, fused_case, kernel_input, kernel_rounding, poison_workspace, reference,
                                       threshold)

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda:0")  # as tensors made on "cuda" name it: the kernels' workspace is keyed by it
FLOAT = ["fp32", "bf16", "fp16"]
QUANTIZED = ["int8", "int4-g32", "int4-g64", "int4-g128"]
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
SMALL = (257, (100, 31, 31))  # three odd segments, as q, k, v


def compiled(module, kernel):
    mod = importlib.import_module(f"sparse_kernels.{module}")
    assert type(getattr(mod, kernel)).__name__ != "InterpretedFunction", "triton was built for the interpreter (TRITON_INTERPRET=1)"
    return mod


@pytest.fixture(scope="module")
def gemv():
    return compiled("gemv", "sparse_gemv_kernel")


@pytest.fixture(scope="module")
def attention():
    return compiled("attention", "_decode_attention_kernel")


def packed(fmt, W, splits=None):
    """fmt: a float format, int8 or int4-g<group size> -> (PackedWeight of W, computing in bf16 if
    quantized; the [out, in] weight it multiplies by)."""
    name, _, group = fmt.partition("-g")
    pw = pack_weight(W, name, splits, group_size=int(group) if group else None, dtype=torch.bfloat16)
    return pw, pw.dequantize()


def with_nan(x):
    """x with a NaN in each row: |NaN| > t is False for every t, so it never passes."""
    x = x.clone()
    rows = x.view(-1, x.shape[-1])
    m = torch.arange(rows.shape[0])
    rows[m, m * 7 % rows.shape[1]] = math.nan
    return x


def segment_slices(splits):
    return [slice(sum(splits[:i]), sum(splits[:i + 1])) for i in range(len(splits))]


# A call's thresholds: the first len(splits) of a row, so every kind meets every segment.
KINDS = [("median", "q90", "zero"), ("inf", "negative", "median"), ("q90", "zero", "inf"), ("zero", "inf", "q90"),
         ("negative", "median", "negative")]
# x: a vector and one row (the decode launch), 6 and 16 rows (the kernel's most), 17 (the dense path).
LEADS = {"float": [(), (1, 1), (2, 3), (MAX_KERNEL_ROWS,), (MAX_KERNEL_ROWS + 1,)], "quantized": [(), (2, 3), (MAX_KERNEL_ROWS + 1,)]}
SHAPES = [(333, (1000,)), SMALL, LLAMA_3_8B["qkv"]]
PLAIN = ([(f, *s) for f in FLOAT + QUANTIZED for s in SHAPES]
         + [("bf16", *s) for s in [(7, (1,)), (100, (77, 77)), (4096, (1024,))]]
         + [(f, 1000, (333,)) for f in FLOAT + QUANTIZED])  # int4: a last partial group at every group size


@pytest.mark.parametrize("fmt,in_f,splits", PLAIN)
def test_sparse_linear_matches_float64(gemv, fmt, in_f, splits):
    """Each weight format and segment layout, 1 to 17 rows, every kind of threshold on each segment
    (+inf: exactly 0); the launcher's poisoned out= ends bitwise equal to sparse_linear's y."""
    torch.manual_seed(in_f)
    pw, W = packed(fmt, torch.randn(sum(splits), in_f, device=CUDA), splits)
    for lead in LEADS["quantized" if fmt in QUANTIZED else "float"]:
        clean = torch.randn(*lead, in_f, device=CUDA).to(pw.dtype)
        x = with_nan(clean)
        rows = x.view(-1, in_f)
        for kinds in KINDS:
            t = torch.tensor([threshold(clean, k) for k in kinds[:len(splits)]], device=CUDA)
            poison_workspace(gemv, CUDA)
            y = sparse_linear(x, pw, t)
            check(y, x, W, t, splits, NAMES[pw.dtype])
            for seg, tk in zip(segment_slices(splits), t.tolist()):
                if tk == math.inf:
                    assert (y[..., seg] == 0).all()
            if rows.shape[0] <= MAX_KERNEL_ROWS:
                out = torch.full((rows.shape[0], sum(splits)), math.nan, dtype=pw.dtype, device=CUDA)
                assert torch.equal(launch(rows, pw, t, None, out=out), y.view(rows.shape[0], -1))


@pytest.mark.parametrize("fmt", FLOAT + QUANTIZED)
def test_inputs_that_are_not_finite(gemv, fmt):
    torch.manual_seed(0)
    pw, W = packed(fmt, torch.randn(1000, 333, device=CUDA))
    for rows in (1, 6, MAX_KERNEL_ROWS + 1):
        x = torch.randn(rows, 333, device=CUDA).to(pw.dtype)
        x[:, 3], x[:, 7] = math.inf, math.nan
        assert (sparse_linear(x, pw, math.inf) == 0).all()  # inf is not > inf; NaN is never > t
        x[:, 3] = 0.01  # under the threshold: dropped
        check(sparse_linear(x, pw, 0.5), x, W, 0.5, pw.splits, NAMES[pw.dtype])


@pytest.mark.parametrize("fmt", FLOAT)
@pytest.mark.parametrize("rows,compact", [(1, False), (1, True), (6, False)])
def test_skipped_rows_are_never_read(gemv, fmt, rows, compact):
    """The weight rows of the channels that no row of x keeps are NaN: a read of one would show in y.
    Both one-row loops (masked, compact) and the several-row one."""
    torch.manual_seed(rows)
    pw, _ = packed(fmt, torch.randn(333, 1000, device=CUDA))
    W = pw.dequantize().clone()  # a float weight's dequantize() is a view of the data poisoned below
    x = torch.randn(rows, 1000, device=CUDA).to(pw.dtype)
    t = torch.tensor([threshold(x, "median" if rows == 1 else "q90")], device=CUDA)
    skipped = (x.float().abs() <= t).all(dim=0)
    assert skipped.any()
    pw.data[skipped] = math.nan
    poison_workspace(gemv, CUDA)
    out = torch.full((rows, 333), math.nan, dtype=pw.dtype, device=CUDA)
    y = launch(x, pw, t, Config(block_n=128, block_k=32, rows_per_program=256, num_warps=4, compact=compact), out=out)
    check(y, x, W, t, pw.splits, fmt)


# One row as a decode step calls it: (format, prologue, in_features, splits).
FUSED = ([(f, p, *SMALL) for f in ("fp32", "bf16", "int8") for p in ("norm", "swiglu", "none")]
         + [("fp16", "norm", *SMALL), ("int4-g32", "swiglu", *SMALL), ("int4-g64", "norm", *SMALL), ("int4-g128", "none", *SMALL)]
         + [(f, p, *LLAMA_3_8B[name]) for f in ("bf16", "int8", "int4-g128")
            for name, p in [("qkv", "norm"), ("o", "none"), ("gate_up", "norm"), ("down", "swiglu")]])


@pytest.mark.parametrize("fmt,prologue,in_f,splits", FUSED)
def test_fused_decode_matches_float64(gemv, fmt, prologue, in_f, splits):
    """The prologue (RMSNorm or SwiGLU), the product, the residual add and the kept count in one
    launch, out and scratch poisoned, against the float64 product of the input the kernel makes."""
    dtype = "bf16" if fmt in QUANTIZED else fmt
    x, kwargs, W, t, res = fused_case(dtype, in_f, splits, prologue, device=CUDA)
    if prologue != "norm":  # (a NaN in RMSNorm's input is a NaN row: nothing passes)
        x = with_nan(x)
    pw, Wk = packed(fmt, W.float(), splits)
    xin = kernel_input(x, kwargs, kernel_rounding(x.dtype, x.device))
    kept = torch.full((len(splits),), 5, dtype=torch.int64, device=CUDA)
    poison_workspace(gemv, CUDA)
    out = torch.full((1, sum(splits)), math.nan, dtype=x.dtype, device=CUDA)
    y = launch(x, pw, t, None, out=out, residual=res, kept=kept, norm_weight=kwargs.get("norm_weight"),
               eps=kwargs.get("norm_eps", 0.0), swiglu=kwargs.get("swiglu", False))
    ref = res.double() + reference(xin, Wk, t, splits)
    assert torch.isfinite(y).all()
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < TOLERANCE[dtype], err
    assert torch.equal(kept - 5, count_kept(xin, t)), "kept adds the active channels to what was there"
    y2 = sparse_linear(x.view(1, 1, -1), pw, t, residual=res.view(1, 1, -1), **kwargs)
    assert torch.equal(y2.view(1, -1), y)


# Explicit configs the tuner may choose: programs of several blocks (each loop), int4's compact loop.
CONFIGS = [Config(512, 16, 1024, 4, True, 2), Config(256, 32, 1024, 4, True, 4), Config(128, 64, 512, 4, False, 3),
           Config(256, 32, 1024, 1, True), Config(128, 16, 256, 1, True)]


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4-g32", "int4-g128"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("name,prologue", [("qkv", "norm"), ("down", "swiglu")])
def test_tuner_configs_match_float64(gemv, fmt, config, name, prologue):
    """The fused decode form at the 8B shapes through each of CONFIGS, as the previous test."""
    in_f, splits = LLAMA_3_8B[name]
    x, kwargs, W, t, res = fused_case("bf16", in_f, splits, prologue, device=CUDA)
    pw, Wk = packed(fmt, W.float(), splits)
    xin = kernel_input(x, kwargs, kernel_rounding(x.dtype, x.device))
    kept = torch.zeros(len(splits), dtype=torch.int64, device=CUDA)
    poison_workspace(gemv, CUDA)
    out = torch.full((1, sum(splits)), math.nan, dtype=x.dtype, device=CUDA)
    y = launch(x, pw, t, config, out=out, residual=res, kept=kept, norm_weight=kwargs.get("norm_weight"),
               eps=kwargs.get("norm_eps", 0.0), swiglu=kwargs.get("swiglu", False))
    ref = res.double() + reference(xin, Wk, t, splits)
    assert torch.isfinite(y).all()
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < TOLERANCE["bf16"], err
    assert torch.equal(kept, count_kept(xin, t))


GRAPH_FORMATS = ["bf16", "int8", "int4-g64"]


@pytest.mark.parametrize("fmt", GRAPH_FORMATS)
@pytest.mark.parametrize("prologue", ["norm", "swiglu"])
def test_fused_forms_for_several_rows(gemv, fmt, prologue):
    """More than one row: the prologue and the count in torch around the kernel (or the dense path
    past MAX_KERNEL_ROWS), the residual in the kernel."""
    for rows in (3, MAX_KERNEL_ROWS + 1):
        x, kwargs, W, t, res = fused_case("bf16", *SMALL, prologue, rows=rows, seed=rows, device=CUDA)
        pw, Wk = packed(fmt, W.float(), SMALL[1])
        kept = torch.zeros(len(SMALL[1]), dtype=torch.int64, device=CUDA)
        y = sparse_linear(x, pw, t, residual=res, kept=kept, **kwargs)
        xin = projection_input(x, **kwargs)
        ref = res.double() + reference(xin, Wk, t, SMALL[1])
        assert ((y.double() - ref).norm() / ref.norm()).item() < TOLERANCE["bf16"]
        assert torch.equal(kept, count_kept(xin, t))


# (prologue, rows): the decode forms of qkv / gate_up and of down, several rows, the dense path.
GRAPH_FORMS = {"norm": ("norm", 1), "swiglu": ("swiglu", 1), "rows": ("none", 6), "dense": ("norm", MAX_KERNEL_ROWS + 1)}


@pytest.mark.parametrize("fmt", GRAPH_FORMATS)
@pytest.mark.parametrize("form", GRAPH_FORMS)
def test_cuda_graph_replay_is_bitwise_eager(gemv, fmt, form):
    """sparse_linear (residual, kept count) captured once after a warm-up; new x, thresholds, norm
    weights and residuals copied into the captured tensors; each replay bitwise equal to eager."""
    prologue, rows = GRAPH_FORMS[form]
    cases = [fused_case("bf16", *SMALL, prologue, rows=rows, seed=seed, device=CUDA) for seed in range(4)]
    pw, _ = packed(fmt, cases[0][2].float(), SMALL[1])

    def call(x, kwargs, t, res, kept):
        return sparse_linear(x, pw, t, residual=res, kept=kept, **kwargs)

    x0, kwargs0, _, t0, res0 = cases[0]
    static = [x0.clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs0.items()}, t0.clone(), res0.clone(),
              torch.zeros(len(SMALL[1]), dtype=torch.int64, device=CUDA)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call(*static)  # compiles the kernel and sizes the workspace: a capture may do neither
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = call(*static)
    x_s, kwargs_s, t_s, res_s, kept_s = static
    for x, kwargs, _, t, res in cases[1:]:
        x_s.copy_(x)
        t_s.copy_(t)
        res_s.copy_(res)
        kept_s.zero_()
        for k, v in kwargs.items():
            if torch.is_tensor(v):
                kwargs_s[k].copy_(v)
        graph.replay()
        kept = torch.zeros_like(kept_s)
        y = call(x, kwargs, t, res, kept)
        assert torch.equal(y_graph, y) and torch.equal(kept_s, kept)
        assert kept.sum() > 0


@pytest.mark.parametrize("fmt", ["bf16", "int4-g64"])
def test_compile_does_not_recompile_for_new_thresholds(gemv, fmt):
    """torch.compile (inductor, fullgraph) of a function calling sparse_linear: one graph for every
    threshold value, and the op's result bitwise eager's."""
    torch._dynamo.reset()
    _, kwargs, W, _, res = fused_case("bf16", *SMALL, "norm", device=CUDA)
    pw, _ = packed(fmt, W.float(), SMALL[1])
    counter = CompileCounterWithBackend("inductor")

    @torch.compile(backend=counter, fullgraph=True)
    def step(x, t, kept):
        y = sparse_linear(x, pw, t, residual=res, kept=kept, **kwargs)
        return y, F.silu(y) * 2

    for seed in range(3):
        x, _, _, t, _ = fused_case("bf16", *SMALL, "norm", seed=seed, device=CUDA)
        x = x.view(1, 1, -1)
        kept, kept_eager = (torch.zeros(len(SMALL[1]), dtype=torch.int64, device=CUDA) for _ in range(2))
        y, z = step(x, t, kept)
        y_eager = sparse_linear(x, pw, t, residual=res, kept=kept_eager, **kwargs)
        assert torch.equal(y, y_eager) and torch.equal(kept, kept_eager)
        torch.testing.assert_close(z, F.silu(y_eager) * 2)
    assert counter.frame_count == 1


@pytest.mark.parametrize("B,heads,D,S,fmt", [(1, (32, 8), 128, 1001, "bf16"), (3, (9, 3), 64, 37, "bf16"), (1, (4, 1), 64, 4097, "bf16"),
                                             (2, (8, 8), 128, 300, "bf16"), (1, (12, 2), 64, 100, "bf16"), (1, (32, 8), 128, 1001, "fp16"),
                                             (1, (12, 2), 64, 100, "fp16"), (3, (9, 3), 64, 37, "fp32"), (1, (4, 1), 64, 4097, "fp32")])
def test_decode_attention_matches_float64(attention, B, heads, D, S, fmt):
    """test_attention's check with the shipped tiles and the GPU's splits: out, partials and the cache
    slots from pos on poisoned, the new cache row bitwise the reference's rope, at the first, a
    middle and the last slot; groups of 4, 3, 1 and 6 q heads, one split to rounds of the combine."""
    for pos in (0, S // 2, S - 1):
        run_and_check(attention, B, heads, S, D, pos, fmt, CUDA)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_head,n_kv_head,D,S,pos", [(32, 8, 128, 1001, 1000), (32, 8, 128, 4097, 300),
                                                      (9, 3, 64, 333, 332), (32, 32, 128, 257, 128)])
def test_decode_attention_against_sdpa(attention, dtype, n_head, n_kv_head, D, S, pos):
    """scripts/benchmark_attention's check: against float64, about as close as torch's SDPA (GQA),
    and the cache row bitwise eager rope's."""
    torch.manual_seed(S)
    got = against_sdpa(make_case(n_head, n_kv_head, D, S, dtype, CUDA, pos=pos), n_head, n_kv_head)
    assert got["cache_row_bitwise"], got
    assert got["max_abs_err"] <= 2 * got["sdpa_max_abs_err"] + torch.finfo(dtype).eps / 16, got


def cuda_model(dtype, weights):
    """helpers.random_model("tiny") (norm weights 1) on the GPU in dtype, its projections in weights."""
    src = random_model("tiny")
    model = Transformer(src.config, dtype=dtype, device=CUDA).load_weights(src.canonical_weights())
    mode, _, group = weights.partition("-g")
    if mode in ("int8", "int4"):
        quantize_model(model, mode, int(group) if group else None)
    return model.eval()


@pytest.mark.parametrize("dtype,weights", [(torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float32, "int8"),
                                           (torch.float32, "int4-g32")])
def test_compiled_sparse_decode_matches_eager(dtype, weights):
    """generate.py's compiled step (reduce-overhead: one CUDA graph a step) gives eager's greedy
    tokens at every sparsity, with no recompile when the thresholds change."""
    torch._dynamo.reset()
    model = cuda_model(dtype, weights)
    model.setup_caches(1, 64)
    decode = generate.compile_decode()
    prompt = torch.tensor([3, 1, 4, 1, 5], dtype=torch.int, device=CUDA)
    dense = generate.generate(model, prompt, 16, generate.decode_one_token, False)
    for i, level in enumerate((0.3, 0.6, 0.0)):
        model.set_thresholds(thresholds_at(model, level, seed=i))
        eager = generate.generate(model, prompt, 16, generate.decode_one_token, True)
        before = counters["stats"]["unique_graphs"]
        compiled_tokens = generate.generate(model, prompt, 16, decode, True)
        assert compiled_tokens.tolist() == eager.tolist(), level
        if i > 0:
            assert counters["stats"]["unique_graphs"] == before, "new thresholds recompiled the decode step"
        if level == 0.6:
            assert eager.tolist() != dense.tolist(), "thresholds that change no token test nothing"
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"


# The persistent decode step (sparse_kernels/persistent.py): a Llama-like model whose GEMV phases
# take the GPU's tile sizes, several splits a block and odd widths (gate/up 1400).
LLAMA_LIKE = ModelArgs(dim=512, n_layer=4, n_head=8, n_kv_head=2, head_dim=64, intermediate_size=1400, vocab_size=512,
                       block_size=256)


def llama_like(weights, seed=0):
    """A random LLAMA_LIKE model on the GPU in bf16, its projections in weights, caches of 256 tokens."""
    mode, _, group = weights.partition("-g")
    return random_llama(LLAMA_LIKE, torch.bfloat16, mode if mode in ("int8", "int4") else None, int(group) if group else None,
                        cache_len=256, device=CUDA, seed=seed)


@pytest.mark.parametrize("weights", ["bf16", "int8", "int4-g64"])
@pytest.mark.parametrize("level", [0.0, 0.5])
def test_persistent_step_matches_per_projection(weights, level):
    """Each decode step through both paths from the same cache. Dense: logits and the cache rows
    within bf16 rounding (the programs' sums are the same; the configs and contraction may differ).
    Sparse, a rounding that moves an input across its threshold flips it, and on a random model the
    flips compound over the layers (measured: 2-18% of the logits' norm at 50% over 4 layers). So
    the bar is the per-projection path's own noise floor, measured here: the persistent path is no
    further from it than every threshold moved by one bf16 ulp moves it. Layer 0's q/k/v see the
    same input in both paths: their kept counts are equal. Kept counts differ at t = 0 too: a bf16
    residual add that cancels exactly gives an input 0 (1-2 of 512, measured), and which entries
    cancel depends on the rounding; a fault (a segment's counts lost) moves them by hundreds."""
    model = llama_like(weights)
    thresholds = thresholds_at(model, level, seed=1)
    runs = {"per-projection": (False, thresholds), "ulp-moved": (False, thresholds * (1 + 2 ** -8)),
            "persistent": (True, thresholds)}
    err = {"ulp-moved": 0.0, "persistent": 0.0}
    kept_diff, kept_total = dict(err), 0
    with torch.no_grad():
        model(torch.randint(0, 512, (1, 100), device=CUDA), torch.arange(100, device=CUDA))
        assert model.use_persistent()
        token = torch.tensor([[7]], device=CUDA)
        for pos in range(100, 104):
            out = {}
            for name, (persistent, t) in runs.items():
                model.set_thresholds(t)
                model.persistent = persistent
                model.record_sparsity(True)
                logits = model(token, torch.tensor([pos], device=CUDA)).float()
                row = torch.cat([layer.attention.kv_cache.k[:, :, pos].flatten() for layer in model.layers]).float()
                out[name] = (logits, row, torch.stack([p.kept.sum() for p in model.projections()]).cpu())
            ref, ref_row, ref_kept = out["per-projection"]
            kept_total += int(ref_kept.sum())
            for name in err:
                got, got_row, got_kept = out[name]
                assert torch.isfinite(got).all()
                err[name] += ((got - ref).norm() / ref.norm()).item() + ((got_row - ref_row).norm() / ref_row.norm()).item()
                kept_diff[name] += int((got_kept - ref_kept).abs().sum())
            assert out["persistent"][2][0] == ref_kept[0], "layer 0's q/k/v kept counts differ"
            token = ref[:, -1:].argmax(-1)
        model.record_sparsity(False)
    # Dense, the old bar: 2e-2 a figure, 8 figures (logits and cache rows, 4 steps).
    assert err["persistent"] <= max(0.16, 1.5 * err["ulp-moved"]), err
    assert kept_diff["persistent"] <= kept_total / 1000 + 1.5 * kept_diff["ulp-moved"], (kept_diff, kept_total)
    sparse_kernels.check_decode_layers()


def test_persistent_step_in_a_cuda_graph_replays_bitwise():
    """The whole forward (embedding, the persistent kernel, head) captured once; at each new pos,
    written into the captured tensor, the replay's residual stream (the final norm's input) and
    cache row bitwise the eager step's: the counters reset themselves, pos is read on the device."""
    model = llama_like("bf16", seed=3)
    model.set_thresholds(thresholds_at(model, 0.5, seed=2))
    streams = []
    model.norm.register_forward_hook(lambda module, inputs, output: streams.append(inputs[0]))
    prompt = torch.randint(0, 512, (1, 50), device=CUDA)
    with torch.no_grad():
        model(prompt, torch.arange(50, device=CUDA))
        assert model.use_persistent()
        token, pos = torch.tensor([[11]], device=CUDA), torch.tensor([50], device=CUDA)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(token, pos)  # the warm-up a capture needs
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits_graph = model(token, pos)
        captured = streams[-1]
        k_caches = [layer.attention.kv_cache.k for layer in model.layers]
        for step in range(50, 56):
            pos.fill_(step)
            graph.replay()
            replayed, logits = captured.clone(), logits_graph.clone()
            row = [k[:, :, step].clone() for k in k_caches]
            eager_logits = model(token, pos)
            assert torch.equal(replayed, streams[-1]), step
            assert all(torch.equal(r, k[:, :, step]) for r, k in zip(row, k_caches))
            torch.testing.assert_close(logits, eager_logits)
            token.copy_(eager_logits[:, -1:].argmax(-1))
    sparse_kernels.check_decode_layers()


@pytest.mark.xfail(strict=True, reason="open (issue 16): on the H200 the compiled step's tokens leave the eager persistent "
                   "step's at the third decode step, the first CUDA-graph replay; the eager graph replay is bitwise")
def test_compiled_persistent_decode_gives_the_eager_persistent_tokens():
    """generate.py's compiled step (reduce-overhead: one CUDA graph) on the persistent path: the greedy
    tokens of the eager persistent step (the same kernel; the per-projection path's tokens differ
    where threshold flips move a near-tie of this random model's logits, see above)."""
    torch._dynamo.reset()
    model = llama_like("bf16", seed=4)
    model.set_thresholds(thresholds_at(model, 0.5, seed=5))
    prompt = torch.tensor([3, 1, 4, 1, 5], dtype=torch.int, device=CUDA)
    assert model.use_persistent()
    eager = generate.generate(model, prompt, 24, generate.decode_one_token, True)
    compiled = generate.generate(model, prompt, 24, generate.compile_decode(), True)
    assert compiled.tolist() == eager.tolist()
    sparse_kernels.check_decode_layers()


def test_persistent_grid_is_resident_and_a_wait_never_met_is_an_error():
    """The probe passed with the computed grid; a producer that never signals (a done counter set far
    below zero) makes check_decode_layers raise, in seconds, and the next step is right again."""
    from sparse_kernels import persistent

    model = llama_like("bf16", seed=6)
    with torch.no_grad():
        model(torch.randint(0, 512, (1, 8), device=CUDA), torch.arange(8, device=CUDA))
        assert model.use_persistent()
        x = torch.zeros(1, 1, LLAMA_LIKE.dim, dtype=torch.bfloat16, device=CUDA)
        step = persistent.step_for(x, torch.zeros(1, dtype=torch.long, device=CUDA), *model.decode_layers_args())
        kernel = persistent.persistent_decode_kernel.warmup(**step.args, x_ptr=x, pos_ptr=step.table, grid=(1,), COUNT=False,
                                                            **step.meta)
        kernel._init_handles()
        sms = torch.cuda.get_device_properties(CUDA).multi_processor_count
        assert step.programs(False) == persistent.resident_programs(kernel, CUDA) >= sms
        token, pos = torch.tensor([[5]], device=CUDA), torch.tensor([8], device=CUDA)
        step.sync[2] = -10**6  # layer 0's o counter
        model(token, pos)
        with pytest.raises(RuntimeError, match="gave up waiting"):
            sparse_kernels.check_decode_layers()
        assert (step.sync == 0).all()
        model.persistent = False
        ref = model(token, pos)
        model.persistent = True
        got = model(token, pos)
        assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-2
    sparse_kernels.check_decode_layers()
