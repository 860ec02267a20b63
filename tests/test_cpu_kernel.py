"""The CPU sparse GEMV (sparse_kernels/cpu_kernels.cpp) against float64 and against the torch
reference path, bit for bit; the bundled model's greedy tokens through it; the fallback when it
cannot be built."""
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import generate
import thresholds
from sparse_kernels import cpu, pack_weight, projection_input, sparse_linear
from sparse_kernels.ops import dense_linear
from sparse_kernels.reference import count_kept
from tests.helpers import REPO, SHIPPED

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
CASES = [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16), ("int8", torch.float32),
         ("int8", torch.bfloat16)]


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the CPU kernel cannot be built here (the torch path serves)")
    assert cpu.load(), "the CPU kernel did not build (its line on stderr says why)"


def reference64(x, W, t, splits):
    """float64 (x * (|x| > t_s)) @ W_s.T per segment, the comparison in fp32."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(len(splits))
    keep = x.float().abs().unsqueeze(-2) > t[:, None]
    xs = torch.where(keep, x.double().unsqueeze(-2), 0.0)
    return torch.cat([xs[..., i, :] @ Wi.double().t() for i, Wi in enumerate(W.split(list(splits)))], dim=-1)


def check(y, x, W, t, splits):
    ref = reference64(x, W, t, splits)
    assert y.dtype == x.dtype and y.shape == ref.shape and torch.isfinite(y).all()
    scale = reference64(x.abs(), W.abs(), t, splits).norm()
    if scale == 0:
        assert (y == 0).all()
    else:
        assert ((y.double() - ref).norm() / scale).item() < TOLERANCE[x.dtype]


def launch(x, pw, t, out, **fused):
    """The op itself, into a given (poisoned) out: [M, in] x, one threshold a segment."""
    data, scales, _, _ = pw.kernel_tensors()
    rstd = gate = None
    if fused.get("norm_weight") is not None:
        rstd = torch.rsqrt(x.float().pow(2).mean(-1) + fused["norm_eps"])
    if fused.get("swiglu"):
        gate = torch.nn.functional.silu(x[:, :pw.in_features])
    torch.ops.teal_cpu.sparse_gemv(x, data, t, list(pw.splits), fused.get("norm_weight"), rstd, gate, fused.get("residual"),
                                   scales, fused.get("kept"), out)
    return out


@pytest.mark.parametrize("fmt,dtype", CASES)
@pytest.mark.parametrize("in_f,splits", [(1, (3,)), (3, (1,)), (129, (333,)), (333, (129, 1, 1000)), (1000, (129,))])
@pytest.mark.parametrize("lead", [(), (1,), (2, 3)])
def test_matches_float64(fmt, dtype, in_f, splits, lead):
    torch.manual_seed(in_f + len(lead))
    pw = pack_weight(torch.randn(sum(splits), in_f), fmt, splits, dtype=dtype)
    W = pw.dequantize().float()
    x = torch.randn(*lead, in_f).to(dtype)
    for t in (-1.0, 0.0, x.float().abs().median().item(), math.inf):
        y = sparse_linear(x, pw, t)
        check(y, x, W, t, splits)
        if t == math.inf:
            assert (y == 0).all(), "+inf keeps nothing: exactly 0"


@pytest.mark.parametrize("fmt,dtype", CASES)
def test_every_output_written(fmt, dtype):
    torch.manual_seed(1)
    pw = pack_weight(torch.randn(1000, 333), fmt, (129, 1, 870), dtype=dtype)
    x = torch.randn(3, 333).to(dtype)
    t = torch.tensor([0.3, 0.0, 1.0])
    out = launch(x, pw, t, torch.full((3, 1000), math.nan, dtype=dtype))
    check(out, x, pw.dequantize().float(), t, pw.splits)


def fused_case(dtype, in_f, prologue, rows, seed=0):
    torch.manual_seed(seed)
    x = (torch.randn(rows, 2 * in_f if prologue == "swiglu" else in_f) * 3).to(dtype)
    return x, {"norm": dict(norm_weight=(torch.rand(in_f) + 0.5).to(dtype), norm_eps=1e-5), "swiglu": dict(swiglu=True),
               "none": {}}[prologue]


@pytest.mark.parametrize("fmt,dtype", CASES)
@pytest.mark.parametrize("prologue", ["norm", "swiglu", "none"])
@pytest.mark.parametrize("rows", [1, 3])
def test_fused_forms(fmt, dtype, prologue, rows):
    """Prologue, residual and kept count in one call, against float64 of the reference's input;
    out poisoned; kept adds to what was there."""
    in_f, splits = 129, (100, 37, 37)
    x, fused = fused_case(dtype, in_f, prologue, rows)
    xin = projection_input(x, **fused)
    t = xin.float().abs().flatten().quantile(torch.tensor([0.2, 0.5, 0.9]))
    pw = pack_weight(torch.randn(sum(splits), in_f), fmt, splits, dtype=dtype)
    res = torch.randn(rows, sum(splits)).to(dtype)
    kept = torch.full((3,), 5, dtype=torch.int64)
    y = launch(x, pw, t, torch.full((rows, sum(splits)), math.nan, dtype=dtype), residual=res, kept=kept, **fused)
    ref = res.double() + reference64(xin, pw.dequantize().float(), t, splits)
    assert torch.isfinite(y).all()
    assert ((y.double() - ref).norm() / ref.norm()).item() < TOLERANCE[dtype]
    assert torch.equal(kept - 5, count_kept(xin, t))


@pytest.mark.parametrize("fmt,dtype", CASES)
@pytest.mark.parametrize("prologue", ["norm", "swiglu", "none"])
def test_bitwise_the_reference_path(fmt, dtype, prologue, monkeypatch):
    """One row at the bundled model's shapes: the same bits as the torch reference path (the
    decode step's thresholds then see the same values, so the tokens are the same)."""
    for in_f, splits in [(576, (576, 192, 192)), (576, (1536, 1536)), (1536, (576,))]:
        x, fused = fused_case(dtype, in_f, prologue, 1, seed=in_f)
        t = projection_input(x, **fused).float().abs().flatten().quantile(torch.tensor([0.3, 0.5, 0.7][:len(splits)]))
        pw = pack_weight(torch.randn(sum(splits), in_f) * 0.05, fmt, splits, dtype=dtype)
        res = torch.randn(1, sum(splits)).to(dtype)
        kept = [torch.zeros(len(splits), dtype=torch.int64) for _ in range(2)]
        outs = []
        for flag, k in zip("10", kept):
            monkeypatch.setenv("TEAL_CPU_KERNEL", flag)
            outs.append(sparse_linear(x, pw, t, residual=res, kept=k, **fused))
        assert torch.equal(outs[0], outs[1]) and torch.equal(kept[0], kept[1]), (in_f, splits)


def test_nan_never_passes():
    pw = pack_weight(torch.randn(40, 33), "fp32", (20, 20))
    x = torch.randn(2, 33)
    x[0, 3], x[1, 7] = math.nan, -math.nan
    kept = torch.zeros(2, dtype=torch.int64)
    for t in (-math.inf, -1.0, 0.0):
        kept.zero_()
        y = sparse_linear(x, pw, t, kept=kept)
        assert torch.isfinite(y).all()
        check(y, torch.nan_to_num(x, nan=0.0), pw.dequantize(), t, pw.splits)
        assert kept.tolist() == [64, 64], "a NaN is never counted as kept"


def test_dispatch(monkeypatch):
    """Plain CPU sends up to 16 rows of float and int8 weights to the kernel; TEAL_CPU_KERNEL=0,
    int4 weights and more rows go to torch."""
    calls = []
    launch_kernel = cpu.sparse_gemv
    monkeypatch.setattr(cpu, "sparse_gemv", lambda *a, **k: calls.append(1) or launch_kernel(*a, **k))
    W = torch.randn(64, 32)
    for fmt, group, rows, flag, expected in [("fp32", None, 1, "1", 1), ("int8", None, 16, "1", 1), ("fp32", None, 17, "1", 0),
                                             ("fp32", None, 1, "0", 0), ("int4", 32, 1, "1", 0)]:
        monkeypatch.setenv("TEAL_CPU_KERNEL", flag)
        calls.clear()
        pw = pack_weight(W, fmt, group_size=group)
        x = torch.randn(rows, 32)
        check(sparse_linear(x, pw, 0.5), x, pw.dequantize().float(), 0.5, pw.splits)
        assert len(calls) == expected, (fmt, rows, flag)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,in_f,out_f", [(1, 1, 3), (1, 33, 1), (3, 129, 1000), (16, 576, 97), (2, 1000, 33)])
def test_dense_linear_matches_float64(dtype, rows, in_f, out_f):
    """The head's GEMV (weight [out, in], read in place) into a NaN-poisoned out: every entry written,
    within the dtype's tolerance of float64's x @ W.T."""
    torch.manual_seed(in_f * out_f + rows)
    x, W = torch.randn(rows, in_f).to(dtype), torch.randn(out_f, in_f).to(dtype)
    out = torch.full((rows, out_f), math.nan, dtype=dtype)
    torch.ops.teal_cpu.dense_linear(x, W, out)
    ref = x.double() @ W.double().t()
    assert torch.isfinite(out).all()
    assert ((out.double() - ref).norm() / (x.double().abs() @ W.double().abs().t()).norm()).item() < TOLERANCE[dtype]


def test_dense_linear_dispatch_and_nan(monkeypatch):
    """Up to 16 rows go to the kernel, more rows and TEAL_CPU_KERNEL=0 to F.linear, with the same
    values; a NaN in a row of x is in every output of that row, as in torch's product."""
    calls = []
    launch_kernel = cpu.dense_linear
    monkeypatch.setattr(cpu, "dense_linear", lambda *a: calls.append(1) or launch_kernel(*a))
    W = torch.randn(70, 48)
    for rows, flag, expected in [(1, "1", 1), (16, "1", 1), (17, "1", 0), (1, "0", 0)]:
        monkeypatch.setenv("TEAL_CPU_KERNEL", flag)
        calls.clear()
        x = torch.randn(1, rows, 48)
        y = dense_linear(x, W)
        assert y.shape == (1, rows, 70) and len(calls) == expected, (rows, flag)
        torch.testing.assert_close(y, x @ W.t(), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("TEAL_CPU_KERNEL", "1")
    x = torch.randn(2, 48)
    x[1, 5] = math.nan
    y = dense_linear(x, W)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()


def test_greedy_tokens_of_the_bundled_model_equal_the_reference_path(smollm2, monkeypatch):
    """48 decode steps at each sparsity (the shipped greedy thresholds): the same tokens through the
    kernel as through torch. With another summation order they part within a few steps: one
    near-threshold entry lands on the other side of its threshold, and the step with it."""
    model, _ = smollm2
    table = thresholds.load(SHIPPED)
    prompt = torch.tensor([1, 504, 3458, 253, 655], dtype=torch.int)
    model.setup_caches(1, prompt.numel() + 48)
    try:
        for sparsity in (0.0, 0.25, 0.5):
            model.set_thresholds(table.at(sparsity, "greedy") if sparsity else torch.zeros(model.config.n_layer, 7))
            tokens = []
            for flag in "10":
                monkeypatch.setenv("TEAL_CPU_KERNEL", flag)
                tokens.append(generate.generate(model, prompt, 48, sparse=True).tolist())
            assert tokens[0] == tokens[1], sparsity
    finally:
        model.set_thresholds(torch.zeros(model.config.n_layer, 7))


def test_the_torch_path_serves_where_the_kernel_cannot_be_built(tmp_path):
    """No compiler (CXX names none): one line says so, once, and the torch path gives the answer."""
    code = ("import torch; from sparse_kernels import pack_weight, sparse_linear; torch.manual_seed(0); "
            "pw = pack_weight(torch.randn(8, 16), 'fp32'); x = torch.randn(16); "
            "ys = [sparse_linear(x, pw, 0.5) for _ in range(3)]; "
            "ref = ((x * (x.abs() > 0.5)) @ pw.dequantize().t()); print(all(torch.allclose(y, ref) for y in ys))")
    env = dict(os.environ, CXX=str(tmp_path / "no-compiler"), TEAL_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    lines = [line for line in done.stderr.splitlines() if "CPU kernel" in line]
    assert len(lines) == 2 and "building" in lines[0] and "unavailable" in lines[1] and "torch reference path runs" in lines[1], lines
    assert "Traceback" not in done.stderr
