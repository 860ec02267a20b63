"""The compiled decode step (CPU inductor here; CUDA graphs on a GPU): same tokens as eager, one
graph for every sparsity, and the decode benchmark running end to end."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import generate
from model import ModelArgs, Transformer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelArgs.from_name("tiny"))
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(0, 1.0 if "norm" in name or "embeddings" in name else 0.1)
        for proj in m.projections():
            proj.weight.data.normal_(0, proj.weight.in_features ** -0.5)
    m.setup_caches(1, 64)
    return m.eval()


def thresholds_at(model, level, seed):
    g = torch.Generator().manual_seed(seed)
    return level * (0.5 + torch.rand(model.config.n_layer, 7, generator=g))


def test_compiled_sparse_decode_matches_eager_without_recompiling(model):
    torch._dynamo.reset()
    decode = generate.compile_decode()
    prompt = torch.tensor([3, 1, 4, 1, 5], dtype=torch.int)
    for i, level in enumerate((0.3, 0.6, 0.0)):
        model.set_thresholds(thresholds_at(model, level, seed=i))
        eager = generate.generate(model, prompt, 16, generate.decode_one_token, True)
        before = counters["stats"]["unique_graphs"]
        compiled = generate.generate(model, prompt, 16, decode, True)
        assert compiled.tolist() == eager.tolist()
        if i > 0:
            assert counters["stats"]["unique_graphs"] == before, "new thresholds recompiled the decode step"
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    # Sampling settings are no part of the graph either: the temperature is a tensor, 0 included.
    before = counters["stats"]["unique_graphs"]
    for temperature in (0.8, 0.3, 0.0, 1.5):
        generate.generate(model, prompt, 8, decode, True, temperature, 5)
        if temperature == 0.8:
            before = counters["stats"]["unique_graphs"]  # a new top-k is a new graph; the same one is not
    assert counters["stats"]["unique_graphs"] == before, "a new temperature recompiled the decode step"
    model.set_thresholds(torch.zeros(model.config.n_layer, 7))


def test_thresholds_change_the_tokens(model):
    """Guards the test above against thresholds that do nothing."""
    prompt = torch.tensor([3, 1, 4, 1, 5], dtype=torch.int)
    dense = generate.generate(model, prompt, 16, generate.decode_one_token, False)
    model.set_thresholds(thresholds_at(model, 0.6, seed=1))
    sparse = generate.generate(model, prompt, 16, generate.decode_one_token, True)
    model.set_thresholds(torch.zeros(model.config.n_layer, 7))
    assert sparse.tolist() != dense.tolist()


def test_benchmark_decode_smoke(tmp_path):
    """Every weight format's rows on the CPU (the dense quantized baselines are CUDA kernels)."""
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, "-m", "scripts.benchmark_decode", "--model", "tiny", "--device", "cpu", "--no-compile",
                           "--weights", "bf16", "int8", "int4", "--group-size", "32", "--sparsities", "0.25,0.5",
                           "--new-tokens", "6", "--runs", "1", "--calibration-windows", "4", "--calibration-length", "48",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["variant"] for r in result["rows"]] == (
        ["bf16 dense (torch)"] + [f"{f} {v}" for f in ("bf16", "int8", "int4-g32") for v in ("t=0 (sparse kernels)", "sparse 0.25", "sparse 0.5")])
    for fmt in ("bf16", "int8", "int4-g32"):
        zero, quarter, half = [r for r in result["rows"] if r["format"] == fmt and r["kind"] == "kernel"]
        assert zero["measured_sparsity"] == 0 and quarter["measured_sparsity"] < half["measured_sparsity"]
        assert half["bytes_per_token"] < quarter["bytes_per_token"] < zero["bytes_per_token"]
        assert "fixed_us_per_projection" in result["fixed_costs"][fmt]
    by = {r["variant"]: r["bytes_per_token"] for r in result["rows"]}
    assert by["int4-g32 t=0 (sparse kernels)"] < by["int8 t=0 (sparse kernels)"] < by["bf16 t=0 (sparse kernels)"]
    assert out.with_suffix(".png").stat().st_size > 0 and "| int8 sparse 0.5 |" in out.with_suffix(".md").read_text()


def test_benchmark_decode_interleaved(tmp_path):
    """--interleave: a run of each row in each round, the load after each, every row's ratio the
    median of its rounds' ratios to the first row's (the first's own: 1)."""
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, "-m", "scripts.benchmark_decode", "--model", "tiny", "--device", "cpu", "--dtype", "fp32",
                           "--sparsities", "0.5", "--new-tokens", "6", "--runs", "3", "--interleave", "--calibration-windows", "4",
                           "--calibration-length", "48", "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fp32 dense (torch)", "fp32 t=0 (sparse kernels)", "fp32 sparse 0.5"]
    first = rows[0]["tok_s_runs"]
    for r in rows:
        assert len(r["tok_s_runs"]) == 3 and len(r["load_average_rounds"]) == 3
        ratios = sorted(a / b for a, b in zip(r["tok_s_runs"], first))
        assert r["ratio_to_first"] == ratios[1]
    assert rows[0]["ratio_to_first"] == 1.0 and rows[2]["measured_sparsity"] > 0.3
    assert "Interleaved: 3 rounds" in out.with_suffix(".md").read_text()


def test_benchmark_decode_int8_head(tmp_path):
    """--lm-head int8: the quantized formats' rows with an int8 head (label -head8) read fewer bytes."""
    rows = {}
    for head in ("float", "int8"):
        out = tmp_path / head
        done = subprocess.run([sys.executable, "-m", "scripts.benchmark_decode", "--model", "tiny", "--device", "cpu", "--no-compile",
                               "--weights", "int8", "--lm-head", head, "--sparsities", "0.5", "--new-tokens", "4", "--runs", "1",
                               "--calibration-windows", "4", "--calibration-length", "48", "--out", str(out)],
                              cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        rows[head] = {r["variant"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert list(rows["int8"]) == ["int8-head8 t=0 (sparse kernels)", "int8-head8 sparse 0.5"]
    float_head, int8_head = rows["float"]["int8 t=0 (sparse kernels)"], rows["int8"]["int8-head8 t=0 (sparse kernels)"]
    vocab, dim = 256, 64  # the tiny config: a bf16 head of vocab x dim against int8 plus fp32 scales
    assert float_head["bytes_per_token"] - int8_head["bytes_per_token"] == vocab * dim * 2 - (vocab * dim + vocab * 4)


def test_prefill_is_dense_unless_asked(model):
    prompt = torch.tensor([3, 1, 4, 1, 5], dtype=torch.int)
    model.set_thresholds(thresholds_at(model, 0.6, seed=1))
    seen = {}
    for sparse_prefill in (False, True):
        model.record_sparsity(True)
        generate.generate(model, prompt, 1, sparse=True, sparse_prefill=sparse_prefill)  # one token: prefill only
        seen[sparse_prefill] = int(model.recorded_tokens)
    model.record_sparsity(False)
    model.set_thresholds(torch.zeros(model.config.n_layer, 7))
    assert seen[False] == 0 and seen[True] > 0


def test_benchmark_decode_on_a_real_checkpoint(tmp_path, smollm2_dir):
    """--checkpoint: the real model with its shipped thresholds (greedy rows), sparsity measured."""
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, "-m", "scripts.benchmark_decode", "--checkpoint", str(smollm2_dir), "--device", "cpu",
                           "--dtype", "fp32", "--no-compile", "--sparsities", "0.5", "--new-tokens", "8", "--runs", "1",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["model"] == "smollm2-135m-instruct" and result["method"] == "greedy"
    # 8 tokens after a random-token prompt, with thresholds calibrated on prose: near 0.5, not at it.
    assert 0.4 < result["rows"][-1]["measured_sparsity"] < 0.6


def test_profile_decode_runs_the_step_it_profiles(model):
    """The profiler path calls prefill and decode_n_tokens directly (as generate() does, with a tensor
    temperature); on the CPU it sees no device kernels, but the step must run."""
    from scripts.benchmark_decode import profile_decode
    model.set_thresholds(torch.zeros(model.config.n_layer, 7))
    prof = profile_decode(model, generate.decode_one_token, True, torch.tensor([3, 1, 4], dtype=torch.int), 3, "cpu")
    assert prof["steps"] == 3 and prof["wall_us_per_step"] > 0
