"""The Triton sparse GEMV against a float64 reference, on the CPU through the Triton interpreter.

conftest.py builds triton and the kernel for the interpreter before any test imports triton;
TRITON_INTERPRET=1 is then set for this module only (fixture below), so CPU tensors run the Triton
kernel here while other test modules keep the faster plain-torch CPU path.

Tolerances (relative Frobenius error vs float64): fp32 1e-5; bf16 and fp16 1e-2, typically ~2e-3
for bf16 here because the interpreter rounds fp32 -> bf16 toward zero (the GPU rounds to nearest,
~1e-3) and ~3e-4 for fp16.
"""
import dataclasses
import math

import pytest
import torch

from sparse_kernels import pack_weight, projection_input, sparse_linear
from sparse_kernels.ops import MAX_KERNEL_ROWS, sparse_linear_counted_op, sparse_linear_op
from sparse_kernels.reference import count_kept
from tests.helpers import interpreted

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 1e-2}


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    yield from interpreted("gemv", "sparse_gemv_kernel")


def reference(x, W, thresholds, splits):
    """float64 (x * (|x| > t_s)) @ W_s.T per segment; the comparison in fp32 as the contract says."""
    t = torch.as_tensor(thresholds, dtype=torch.float32, device=x.device).reshape(-1).expand(len(splits))
    keep = x.float().abs().unsqueeze(-2) > t[:, None]  # [..., n_segments, in]
    xs = torch.where(keep, x.double().unsqueeze(-2), 0.0)
    parts = [xs[..., i, :] @ Wi.double().t() for i, Wi in enumerate(W.split(list(splits)))]
    return torch.cat(parts, dim=-1)


def threshold(x, kind):
    absx = x.float().abs().flatten()
    return {"zero": 0.0, "median": absx.median().item(), "q90": torch.quantile(absx, 0.9).item(),
            "inf": math.inf, "negative": -1.0}[kind]


def check(y, x, W, t, splits, fmt):
    """y against the float64 product, relative to the float64 product of |x| and |W| (the scale of
    fp32 summation's error bound, so cancellation in a few outputs cannot fail a right result)."""
    ref = reference(x, W, t, splits)
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    if ref.norm() == 0:
        assert (y == 0).all()
    else:
        err = ((y.double() - ref).norm() / reference(x.abs(), W.abs(), t, splits).norm()).item()
        assert err < TOLERANCE[fmt], err


KINDS = ["zero", "median", "q90", "inf", "negative"]


def lead_kind_cases(leads, n_weights):
    """-> [(leading shape, threshold kinds)]: every kind on every lead for small weights; for large
    ones (seconds a launch in the interpreter) the kinds dealt out over the leads in turn, so each
    lead and each kind is still met, and the small shapes cross them all."""
    if n_weights <= 100_000:
        return [(lead, KINDS) for lead in leads]
    return [(lead, KINDS[i::len(leads)]) for i, lead in enumerate(leads)]


@pytest.fixture(params=["masked", "compact"])
def loop(request, triton_interpreter, monkeypatch):
    """Run a test once with each of the kernel's two loops."""
    from sparse_kernels import configs

    gemv, default = triton_interpreter, configs.default_config
    compact = request.param == "compact"
    monkeypatch.setattr(configs, "default_config", lambda *a: dataclasses.replace(default(*a), compact=compact))
    gemv.clear_plans()
    yield gemv
    gemv.clear_plans()


def poison_workspace(gemv, device="cpu"):
    """NaN in every scratch value a kernel may read before writing it (indices: row 0, in bounds)."""
    partials, _, index, value = gemv.workspace.get(torch.device(device), partials=1, counters=1, index=1, value=1)
    partials.fill_(math.nan)
    value.fill_(math.nan)
    index.fill_(0)


@pytest.mark.parametrize("fmt", DTYPES)
@pytest.mark.parametrize("in_f,out_f", [(1, 7), (7, 1), (100, 257), (257, 100), (1000, 1000)])
def test_matches_float64(loop, in_f, out_f, fmt):
    W = torch.randn(out_f, in_f).to(DTYPES[fmt])
    pw = pack_weight(W, fmt)
    for lead, kinds in lead_kind_cases([(), (1,), (1, 1), (3, 5)], in_f * out_f):
        x = torch.randn(*lead, in_f).to(DTYPES[fmt])
        for kind in kinds:
            t = threshold(x, kind)
            poison_workspace(loop)
            y = sparse_linear(x, pw, torch.tensor(t))
            check(y, x, W, t, pw.splits, fmt)
            if kind == "inf":
                assert (y == 0).all()


@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
@pytest.mark.parametrize("in_f,splits", [(257, (100, 30, 30)), (100, (77, 77)), (1000, (512, 128, 128)), (7, (1, 6))])
@pytest.mark.parametrize("rows", [1, 4])
def test_segments(loop, in_f, splits, rows, fmt):
    W = torch.randn(sum(splits), in_f).to(DTYPES[fmt])
    pw = pack_weight(W, fmt, splits)
    x = torch.randn(rows, in_f).to(DTYPES[fmt])
    kinds = [["median", "q90", "zero"], ["inf", "negative", "median"], ["q90", "median", "inf"]]
    for ks in kinds:
        t = torch.tensor([threshold(x, k) for k in ks[:len(splits)]])
        poison_workspace(loop)
        y = sparse_linear(x, pw, t)
        check(y, x, W, t, splits, fmt)
        for i, (start, width) in enumerate(zip([0, *torch.tensor(splits).cumsum(0).tolist()], splits)):
            if t[i] == math.inf:
                assert (y[..., start:start + width] == 0).all()


@pytest.mark.parametrize("config", [None, (16, 16, 16, 4, True), (32, 16, 48, 4, True), (64, 32, 1024, 4, True),
                                    (128, 16, 32, 8, True), (32, 16, 48, 4, False), (64, 32, 1024, 4, False),
                                    (16, 16, 48, 4, True, 3), (16, 16, 48, 4, False, 2)])
@pytest.mark.parametrize("rows", [1, 5])
def test_every_output_written(triton_interpreter, config, rows):
    """Block sizes that do and do not divide the segments, one split or several (the last one
    short), programs of one block or several: outputs and partials start as NaN, so an element
    nobody wrote fails."""
    gemv = triton_interpreter
    splits, in_f = (64, 32, 32), 100
    W = torch.randn(sum(splits), in_f, dtype=torch.bfloat16)
    x = torch.randn(rows, in_f, dtype=torch.bfloat16)
    t = torch.tensor([0.3, 0.9, 0.0])
    cfg = gemv.Config(*config) if config else None
    poison_workspace(gemv)
    out = torch.full((rows, sum(splits)), math.nan, dtype=torch.bfloat16)
    y = gemv.sparse_gemv(x, pack_weight(W, "bf16", splits).data, t, splits, cfg, out=out)
    check(y, x, W, t, splits, "bf16")
    (counters,) = gemv.workspace.get(torch.device("cpu"), counters=1)
    assert (counters == 0).all(), "the last program of each block resets its counter"


def test_deterministic(triton_interpreter):
    W = torch.randn(300, 1000, dtype=torch.bfloat16)
    pw = pack_weight(W, "bf16")
    x = torch.randn(1, 1000, dtype=torch.bfloat16)
    y1, y2 = sparse_linear(x, pw, 0.5), sparse_linear(x, pw, 0.5)
    assert torch.equal(y1, y2)


def test_inputs_that_are_not_finite(triton_interpreter):
    W = torch.randn(50, 40, dtype=torch.float16)
    pw = pack_weight(W, "fp16")
    x = torch.randn(1, 40, dtype=torch.float16)
    x[0, 3], x[0, 7] = math.inf, math.nan
    assert (sparse_linear(x, pw, math.inf) == 0).all()  # inf is not > inf; NaN is never > t
    finite = x.clone()
    finite[0, 3] = 0
    y = sparse_linear(finite, pw, 0.5)
    check(y, finite, W, 0.5, pw.splits, "fp16")


def test_threshold_forms(triton_interpreter):
    W = torch.randn(30, 20, dtype=torch.bfloat16)
    pw = pack_weight(W, "bf16", (10, 20))
    x = torch.randn(2, 20, dtype=torch.bfloat16)
    y = sparse_linear(x, pw, 0.4)
    assert torch.equal(y, sparse_linear(x, pw, torch.tensor(0.4)))
    assert torch.equal(y, sparse_linear(x, pw, torch.tensor([0.4, 0.4])))
    with pytest.raises(ValueError):
        sparse_linear(x, pw, torch.tensor([0.1, 0.2, 0.3]))


def test_many_rows_use_masked_matmul(triton_interpreter):
    W = torch.randn(96, 64, dtype=torch.bfloat16)
    pw = pack_weight(W, "bf16", (32, 64))
    x = torch.randn(2, MAX_KERNEL_ROWS, 64, dtype=torch.bfloat16)
    t = torch.tensor([0.7, 0.2])
    check(sparse_linear(x, pw, t), x, W, t, pw.splits, "bf16")


def test_dispatch(triton_interpreter, monkeypatch):
    calls = []
    launch = triton_interpreter.sparse_gemv
    monkeypatch.setattr(triton_interpreter, "sparse_gemv", lambda *a, **k: calls.append(1) or launch(*a, **k))
    W = torch.randn(8, 16)
    pw = pack_weight(W, "fp32")
    x = torch.randn(16)
    y = sparse_linear(x, pw, 0.5)
    assert calls, "CPU tensors under TRITON_INTERPRET=1 run the Triton kernel"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls.clear()
    torch.testing.assert_close(sparse_linear(x, pw, 0.5), y)
    assert not calls, "plain CPU runs the torch reference"


def test_custom_op_registration(triton_interpreter):
    W = torch.randn(24, 40, dtype=torch.bfloat16)
    pw = pack_weight(W, "bf16", (8, 8, 8))
    x = torch.randn(1, 1, 40, dtype=torch.bfloat16)
    t = torch.tensor([0.1, 0.5, 0.9])
    torch.library.opcheck(sparse_linear_op, (x, pw.data, t, list(pw.splits)))
    g, res = torch.rand(40, dtype=torch.bfloat16) + 0.5, torch.randn(1, 1, 24, dtype=torch.bfloat16)
    torch.library.opcheck(sparse_linear_op, (x, pw.data, t, list(pw.splits), g, 1e-5, False, res))
    torch.library.opcheck(sparse_linear_counted_op, (x, pw.data, t, list(pw.splits), torch.zeros(3, dtype=torch.int64)))


def test_torch_compile_fullgraph_no_recompile(triton_interpreter):
    """The op traces whole under fullgraph, matches eager, and new threshold values reuse the graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    W = torch.randn(48, 64, dtype=torch.bfloat16)
    pw = pack_weight(W, "bf16", (16, 16, 16))
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True)
    def step(x, t):
        return torch.nn.functional.silu(sparse_linear(x, pw, t)) * 2

    for t in ([0.0, 0.5, 1.0], [1.5, 0.1, 0.3], [math.inf, -1.0, 0.7]):
        t = torch.tensor(t)
        x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
        torch.testing.assert_close(step(x, t), torch.nn.functional.silu(sparse_linear(x, pw, t)) * 2)
    assert counter.frame_count == 1


def test_setup_caches_sizes_the_workspace_before_decode(triton_interpreter):
    """A CUDA graph's warm-up run allocates from the graph's private pool, which refuses a workspace
    made there: setup_caches must leave a decode step (fused projections, attention) nothing to
    allocate. Wide enough that the fused forms' scratch outgrows the smallest workspace buffers."""
    from model import ModelArgs, Transformer

    gemv = triton_interpreter
    gemv.workspace.buffers.pop(torch.device("cpu"), None)
    config = ModelArgs(dim=512, n_layer=1, n_head=4, n_kv_head=2, intermediate_size=2048, vocab_size=64, block_size=300)
    model = Transformer(config, dtype=torch.float32)
    model.setup_caches(1, 300)
    sized = {kind: buf.data_ptr() for kind, buf in gemv.workspace.buffers[torch.device("cpu")].items()}
    assert set(sized) == set(gemv.workspace.KINDS)
    model.set_thresholds(torch.full((model.config.n_layer, 7), 0.5))
    model(torch.tensor([[3]]), torch.tensor([0]), sparse=True)
    assert {kind: buf.data_ptr() for kind, buf in gemv.workspace.buffers[torch.device("cpu")].items()} == sized


# The fused forms. The prologues round to x's dtype twice (RMSNorm: x * rstd, then * weight;
# SwiGLU: silu, then * up) as the unfused model does. The interpreter rounds fp32 -> bf16 toward
# zero where torch (and the GPU) round to nearest, so the reference input is made with the rounding
# of the platform the kernel runs on; the float64 product of that input is then the reference.


def kernel_rounding(dtype, device):
    if dtype == torch.bfloat16 and device.type == "cpu":  # the interpreter's cast: drop the low 16 bits of the fp32
        return lambda v: (v.float().contiguous().view(torch.int32) & -65536).view(torch.float32)
    return lambda v: v.to(dtype).float()


def kernel_input(x, kwargs, rnd):
    """The input proper, computed as the kernel computes it, rounding with rnd."""
    x32 = x.float()
    if "norm_weight" in kwargs:
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + kwargs["norm_eps"])
        return rnd(rnd(x32 * rstd) * kwargs["norm_weight"].float())
    if kwargs.get("swiglu"):
        gate, up = x32.chunk(2, dim=-1)
        return rnd(rnd(gate * torch.sigmoid(gate)) * up)
    return x32


def midpoint_thresholds(x, quantiles):
    """Thresholds halfway between neighbouring distinct |x|: an entry sits on none of them."""
    v = x.float().abs().flatten().unique().sort().values
    return torch.tensor([((v[int(q * (len(v) - 1))] + v[int(q * (len(v) - 1)) + 1]) / 2).item() for q in quantiles])


def fused_case(fmt, in_f, splits, prologue, rows=1, seed=0, device="cpu"):
    """-> x, kwargs of sparse_linear, W, thresholds, residual (made on the CPU, then moved to device)."""
    torch.manual_seed(seed)
    dtype = DTYPES[fmt]
    x = (torch.randn(rows, 2 * in_f if prologue == "swiglu" else in_f) * 3).to(dtype)
    kwargs = {"norm": dict(norm_weight=(torch.rand(in_f) + 0.5).to(dtype), norm_eps=1e-5),
              "swiglu": dict(swiglu=True), "none": {}}[prologue]
    t = midpoint_thresholds(projection_input(x, **kwargs), [0.2, 0.55, 0.9][:len(splits)])
    kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
    W, res = torch.randn(sum(splits), in_f).to(dtype), torch.randn(rows, sum(splits)).to(dtype)
    return x.to(device), kwargs, W.to(device), t.to(device), res.to(device)


@pytest.mark.parametrize("fmt", DTYPES)
@pytest.mark.parametrize("prologue", ["norm", "swiglu", "none"])
@pytest.mark.parametrize("in_f,splits", [(100, (37, 20, 20)), (257, (100,)), (64, (33, 31))])
def test_fused_decode_matches_float64(loop, fmt, prologue, in_f, splits):
    """One row: prologue, product, residual add and kept count in one launch, against the float64
    product of the input the kernel should make, plus the residual; outputs and scratch poisoned."""
    x, kwargs, W, t, res = fused_case(fmt, in_f, splits, prologue)
    xin = kernel_input(x, kwargs, kernel_rounding(x.dtype, x.device))
    pw = pack_weight(W, fmt, splits)
    kept = torch.full((len(splits),), 5, dtype=torch.int64)
    poison_workspace(loop)
    out = torch.full((1, sum(splits)), math.nan, dtype=x.dtype)
    y = loop.sparse_gemv(x, pw.data, t, splits, out=out, residual=res, kept=kept,
                         norm_weight=kwargs.get("norm_weight"), eps=kwargs.get("norm_eps", 0.0), swiglu=kwargs.get("swiglu", False))
    ref = res.double() + reference(xin, W, t, splits)
    assert torch.isfinite(y).all()
    assert ((y.double() - ref).norm() / ref.norm()).item() < TOLERANCE[fmt]
    assert torch.equal(kept - 5, count_kept(xin, t)), "kept adds the active channels to what was there"
    # Through the public entry point with a leading [1, 1]: the same launch.
    y2 = sparse_linear(x.view(1, 1, -1), pw, t, residual=res.view(1, 1, -1), **kwargs)
    assert torch.equal(y2.view(1, -1), y)


def test_kept_count_over_long_ranges(triton_interpreter):
    """A program's range longer than the counting pass's chunk (COMPACT_BLOCK rows): every chunk
    is counted, by the first block's programs only, once."""
    gemv = triton_interpreter
    in_f, splits = gemv.COMPACT_BLOCK + 300, (24, 16)
    x = torch.randn(1, in_f)
    t = torch.tensor([0.5, 1.2])
    kept = torch.zeros(2, dtype=torch.int64)
    W = torch.randn(sum(splits), in_f)
    y = gemv.sparse_gemv(x, pack_weight(W, "fp32", splits).data, t, splits, gemv.Config(16, 16, in_f + 16, 4, False), kept=kept)
    check(y, x, W, t, splits, "fp32")
    assert torch.equal(kept, count_kept(x, t))


def test_register_cap(triton_interpreter):
    """A cap only where the grid fits the SMs in one wave at 128 or more registers a thread."""
    cap = triton_interpreter.register_cap
    assert cap(448, 4, 132) == 128  # down: 4 programs an SM
    assert cap(384, 4, 132) == 168  # qkv: 3
    assert cap(256, 4, 132) is None  # 2 an SM: any count of registers fits
    assert cap(112, 8, 132) is None
    assert cap(1792, 4, 132) is None  # several waves whatever the registers


@pytest.mark.parametrize("prologue", ["norm", "swiglu"])
def test_fused_forms_for_several_rows(triton_interpreter, prologue):
    """More than one row: the prologue, the count and the add run in torch around the kernel (or the
    masked matmul past MAX_KERNEL_ROWS), with the same results as the reference."""
    for rows in (3, MAX_KERNEL_ROWS + 1):
        x, kwargs, W, t, res = fused_case("fp32", 64, (40, 24), prologue, rows=rows, seed=rows)
        xin = projection_input(x, **kwargs)
        pw = pack_weight(W, "fp32", (40, 24))
        kept = torch.zeros(2, dtype=torch.int64)
        y = sparse_linear(x, pw, t, residual=res, kept=kept, **kwargs)
        ref = res.double() + reference(xin, W, t, (40, 24))
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5
        assert torch.equal(kept, count_kept(xin, t))


def test_residual_for_several_rows_in_the_kernel(triton_interpreter):
    gemv = triton_interpreter
    W, x, res = torch.randn(50, 70), torch.randn(4, 70), torch.randn(4, 50)
    t = torch.tensor([0.4])
    poison_workspace(gemv)
    y = gemv.sparse_gemv(x, pack_weight(W, "fp32").data, t, (50,), residual=res, out=torch.full((4, 50), math.nan))
    ref = res.double() + reference(x, W, t, (50,))
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_fused_forms_on_plain_cpu(triton_interpreter, monkeypatch):
    """Without the interpreter the torch reference serves the same calls."""
    x, kwargs, W, t, res = fused_case("fp32", 48, (30,), "swiglu")
    xin = projection_input(x, **kwargs)
    pw = pack_weight(W, "fp32")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kept = torch.zeros(1, dtype=torch.int64)
    y = sparse_linear(x, pw, t, residual=res, kept=kept, **kwargs)
    ref = res.double() + reference(xin, W, t, (30,))
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5
    assert torch.equal(kept, count_kept(xin, t))


def test_fused_bad_arguments(triton_interpreter):
    gemv = triton_interpreter
    W = pack_weight(torch.randn(8, 16), "fp32").data
    t = torch.zeros(1)
    with pytest.raises(ValueError, match="one row"):
        gemv.sparse_gemv(torch.randn(2, 16), W, t, (8,), norm_weight=torch.ones(16))
    with pytest.raises(ValueError, match="norm_weight"):
        gemv.sparse_gemv(torch.randn(1, 16), W, t, (8,), norm_weight=torch.ones(15))
    with pytest.raises(ValueError, match="residual"):
        gemv.sparse_gemv(torch.randn(1, 16), W, t, (8,), residual=torch.ones(1, 9))
    with pytest.raises(ValueError, match="kept"):
        gemv.sparse_gemv(torch.randn(1, 16), W, t, (8,), kept=torch.zeros(1))
    with pytest.raises(ValueError, match="features"):
        sparse_linear(torch.randn(16), pack_weight(torch.randn(8, 16), "fp32"), 0.1, swiglu=True)


# int8 and int4 weights: the same contract against the float64 product of pw.dequantize(), the
# weight the kernel multiplies by (quantization error is the quantizer's, tested in test_quantize).

QUANTIZED = {"int8": None, "int4-g32": 32, "int4-g128": 128}


def quantized(fmt, W, splits, dtype):
    group = QUANTIZED[fmt]
    pw = pack_weight(W, fmt.split("-")[0], splits, group_size=group, dtype=dtype)
    return pw, pw.dequantize()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("in_f,out_f", [(1, 3), (3, 1), (129, 333), (333, 129), (1000, 129)])
def test_quantized_matches_float64(loop, in_f, out_f, fmt, dtype):
    pw, Wq = quantized(fmt, torch.randn(out_f, in_f), (out_f,), DTYPES[dtype])
    for lead, kinds in lead_kind_cases([(), (1,), (1, 1), (2, 3)], in_f * out_f):
        x = torch.randn(*lead, in_f).to(DTYPES[dtype])
        for kind in kinds:
            t = threshold(x, kind)
            poison_workspace(loop)
            y = sparse_linear(x, pw, torch.tensor(t))
            check(y, x, Wq, t, pw.splits, dtype)
            if kind == "inf":
                assert (y == 0).all()


@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("in_f,splits", [(257, (100, 31, 31)), (100, (77, 77)), (7, (1, 6)), (64, (64, 16, 16))])
@pytest.mark.parametrize("rows", [1, 4, MAX_KERNEL_ROWS + 1])
def test_quantized_segments(loop, in_f, splits, rows, fmt):
    """Odd segment widths (int4: a segment ends in half a byte), a threshold each, several rows."""
    pw, Wq = quantized(fmt, torch.randn(sum(splits), in_f), splits, torch.bfloat16)
    x = torch.randn(rows, in_f).to(torch.bfloat16)
    for ks in [["median", "q90", "zero"], ["inf", "negative", "median"]]:
        t = torch.tensor([threshold(x, k) for k in ks[:len(splits)]])
        poison_workspace(loop)
        y = sparse_linear(x, pw, t)
        check(y, x, Wq, t, splits, "bf16")
        for i, (start, width) in enumerate(zip([0, *torch.tensor(splits).cumsum(0).tolist()], splits)):
            if t[i] == math.inf:
                assert (y[..., start:start + width] == 0).all()


@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("prologue", ["norm", "swiglu", "none"])
def test_quantized_fused_decode_matches_float64(loop, fmt, prologue):
    """The decode forms on quantized weights: prologue, product, residual and count in one launch,
    out and scratch poisoned, an inactive NaN and inf in x dropped."""
    in_f, splits = 100, (37, 20, 20)
    x, kwargs, W, t, res = fused_case("bf16", in_f, splits, prologue)
    pw, Wq = quantized(fmt, W.float(), splits, torch.bfloat16)
    xin = kernel_input(x, kwargs, kernel_rounding(x.dtype, x.device))
    kept = torch.zeros(len(splits), dtype=torch.int64)
    poison_workspace(loop)
    data, scales, zeros, group = pw.kernel_tensors()
    out = torch.full((1, sum(splits)), math.nan, dtype=x.dtype)
    y = loop.sparse_gemv(x, data, t, splits, out=out, residual=res, kept=kept, norm_weight=kwargs.get("norm_weight"),
                         eps=kwargs.get("norm_eps", 0.0), swiglu=kwargs.get("swiglu", False), scales=scales, zeros=zeros,
                         group_size=group)
    ref = res.double() + reference(xin, Wq, t, splits)
    assert torch.isfinite(y).all()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
    assert torch.equal(kept, count_kept(xin, t))


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_quantized_inputs_that_are_not_finite(triton_interpreter, fmt):
    pw, Wq = quantized(fmt, torch.randn(50, 40), (50,), torch.float32)
    x = torch.randn(1, 40)
    x[0, 3], x[0, 7] = math.inf, math.nan
    assert (sparse_linear(x, pw, math.inf) == 0).all()  # inf is not > inf; NaN is never > t
    x[0, 3] = 0.01  # below the threshold: dropped
    y = sparse_linear(x, pw, 0.5)
    finite = torch.where(x.abs() > 0.5, x, 0.0)
    check(y, finite, Wq, 0.5, pw.splits, "fp32")


def test_quantized_weights_need_their_scales(triton_interpreter):
    gemv = triton_interpreter
    pw = pack_weight(torch.randn(8, 64), "int4", group_size=32)
    data, scales, zeros, group = pw.kernel_tensors()
    x, t = torch.randn(1, 64, dtype=torch.bfloat16), torch.zeros(1)
    with pytest.raises(ValueError, match="int4 weights need"):
        gemv.sparse_gemv(x, data, t, (8,), scales=scales)
    with pytest.raises(ValueError, match="int4 scales and zeros"):
        gemv.sparse_gemv(x, data, t, (8,), scales=scales[:1], zeros=zeros[:1], group_size=group)
    with pytest.raises(ValueError, match="int8 weights need"):
        gemv.sparse_gemv(x, pack_weight(torch.randn(8, 64), "int8").data, t, (8,))


@pytest.mark.parametrize("fmt", ["bf16", *QUANTIZED])
@pytest.mark.parametrize("config", [(16, 16, 64, 4, True, 2), (32, 16, 128, 4, True, 3), (16, 16, 1024, 4, True, 4),
                                    (16, 16, 64, 4, False, 2), (32, 32, 1024, 4, False, 3)])
def test_programs_of_several_blocks(triton_interpreter, fmt, config):
    """A program taking 2-4 consecutive blocks of a segment (the last program of a segment fewer),
    each loop, every format (int4: groups of tiles, the compact loop's padded ones, a last partial
    group): the fused one-row form (norm, residual, kept) and several rows, against float64; the
    outputs, partials and scratch poisoned, the split counters reset."""
    gemv = triton_interpreter
    in_f, splits = 257, (100, 31, 31)
    cfg = gemv.Config(*config)
    x, kwargs, W, t, res = fused_case("bf16", in_f, splits, "norm")
    pw, Wq = (pack_weight(W, "bf16", splits), W) if fmt == "bf16" else quantized(fmt, W.float(), splits, torch.bfloat16)
    data, scales, zeros, group = pw.kernel_tensors()
    xin = kernel_input(x, kwargs, kernel_rounding(x.dtype, x.device))
    kept = torch.zeros(len(splits), dtype=torch.int64)
    poison_workspace(gemv)
    out = torch.full((1, sum(splits)), math.nan, dtype=x.dtype)
    y = gemv.sparse_gemv(x, data, t, splits, cfg, out=out, residual=res, kept=kept, norm_weight=kwargs["norm_weight"],
                         eps=kwargs["norm_eps"], scales=scales, zeros=zeros, group_size=group)
    ref = res.double() + reference(xin, Wq, t, splits)
    assert torch.isfinite(y).all()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
    assert torch.equal(kept, count_kept(xin, t)), "each segment counted once"
    xs = torch.randn(5, in_f).to(torch.bfloat16)
    poison_workspace(gemv)
    out = torch.full((5, sum(splits)), math.nan, dtype=xs.dtype)
    y = gemv.sparse_gemv(xs, data, t, splits, cfg, out=out, scales=scales, zeros=zeros, group_size=group)
    check(y, xs, Wq, t, splits, "bf16")
    (counters,) = gemv.workspace.get(torch.device("cpu"), counters=1)
    assert (counters == 0).all(), "the last program of each block resets its counter"
