"""The persistent decode step (sparse_kernels/persistent.py) against the per-projection kernels, on
the CPU through the Triton interpreter, where it runs as one program taking every task in order.

The two paths run the same program code with the same configs, so with the interpreter (no fused
multiply-adds) every sum is made in the same order: logits, caches and kept counts are compared
bitwise, step after step, on a model with odd widths, in every weight format, dense, sparse and
with every input dropped."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import generate
from model import ModelArgs
from sparse_kernels import check_decode_layers
from tests.helpers import REPO, interpreted, random_llama
from tests.test_decode import thresholds_at

# Odd widths: q, k, v of 96, 32 and 32; gate and up of 100 (int4: a last group of 4 at group size 32).
ODD = ModelArgs(dim=96, n_layer=2, n_head=6, n_kv_head=2, head_dim=16, intermediate_size=100, vocab_size=128, block_size=64)
FORMATS = {"fp32": (torch.float32, None, None), "bf16": (torch.bfloat16, None, None), "int8": (torch.bfloat16, "int8", None),
           "int4-g32": (torch.bfloat16, "int4", 32)}


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    yield from interpreted("persistent", "persistent_decode_kernel")


def odd_model(fmt, seed=0):
    """A random model of ODD's shape in a weight format, caches for one sequence of 64 tokens."""
    dtype, mode, group = FORMATS[fmt]
    return random_llama(ODD, dtype, mode, group, cache_len=64, seed=seed)


def caches(model):
    return [t.clone() for layer in model.layers for t in (layer.attention.kv_cache.k, layer.attention.kv_cache.v)]


# Every format sparse; dense and every input dropped once (the thresholds' paths are format-free).
@pytest.mark.parametrize("fmt, level", [(fmt, 0.5) for fmt in FORMATS] + [("bf16", 0.0), ("int4-g32", math.inf)])
def test_steps_are_bitwise_the_per_projection_steps(fmt, level):
    """Each decode step through both paths from the same cache: the same logits, the same cache rows
    written, the same kept counts; +inf drops every input (the layers add nothing to the stream)."""
    model = odd_model(fmt)
    model.set_thresholds(torch.full((ODD.n_layer, 7), math.inf) if level == math.inf else thresholds_at(model, level, seed=1))
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        model(prompt, torch.arange(5))  # a dense prefill fills slots 0..4
        assert model.use_persistent()
        token = torch.tensor([[7]])
        for pos in range(5, 9):
            input_pos = torch.tensor([pos])
            results = []
            for persistent in (False, True):  # per-projection first; the persistent step rewrites slot pos
                model.persistent = persistent
                model.record_sparsity(True)
                logits = model(token, input_pos)
                results.append((logits, caches(model), [p.kept.clone() for p in model.projections()]))
            (ref, ref_caches, ref_kept), (got, got_caches, got_kept) = results
            assert torch.isfinite(ref).all() and torch.equal(got, ref), pos
            assert all(torch.equal(a, b) for a, b in zip(got_caches, ref_caches))
            assert all(torch.equal(a, b) for a, b in zip(got_kept, ref_kept))
            if level == 0.5:
                kept = sum(int(k.sum()) for k in ref_kept)
                assert 0 < kept < sum(p.weight.in_features * len(p.weight.splits) for p in model.projections())
            token = ref[:, -1:].argmax(-1)
        model.record_sparsity(False)
        check_decode_layers()


def test_greedy_tokens_equal_and_compiled_step_too():
    """generate(): the persistent path's greedy tokens are the per-projection path's, eager and
    through torch.compile (the custom op, its fake and the caches it mutates)."""
    model = odd_model("fp32", seed=2)
    model.set_thresholds(thresholds_at(model, 0.4, seed=3))
    prompt = torch.tensor([3, 1, 4, 1, 5], dtype=torch.int)
    dense = generate.generate(model, prompt, 8, generate.decode_one_token, False)
    ref = generate.generate(model, prompt, 8, generate.decode_one_token, True)
    assert ref.tolist() != dense.tolist(), "thresholds that change no token test nothing"
    assert model.use_persistent()
    assert generate.generate(model, prompt, 8, generate.decode_one_token, True).tolist() == ref.tolist()
    torch._dynamo.reset()
    compiled = generate.generate(model, prompt, 8, torch.compile(generate.decode_one_token, fullgraph=True), True)
    assert compiled.tolist() == ref.tolist()
    check_decode_layers()


def test_a_wait_that_is_never_met_reports_an_error():
    """A producer that never signals (qkv's done counter of layer 0 set far below zero): the waits
    give up, check_decode_layers raises; the counters are reset, and the next step is right."""
    from sparse_kernels import persistent

    model = odd_model("bf16")
    model.set_thresholds(thresholds_at(model, 0.3, seed=4))
    with torch.no_grad():
        model(torch.tensor([[3, 1, 4]]), torch.arange(3))
        assert model.use_persistent()
        step = persistent.step_for(torch.zeros(1, 1, ODD.dim, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.long),
                                   *model.decode_layers_args())
        step.sync[0] = -10**6
        model(torch.tensor([[7]]), torch.tensor([3]))
        with pytest.raises(RuntimeError, match="gave up waiting"):
            check_decode_layers()
        assert (step.sync == 0).all(), "the counters are reset and the flag cleared"
        model.persistent = False
        ref = model(torch.tensor([[7]]), torch.tensor([3]))
        model.persistent = True
        assert torch.equal(model(torch.tensor([[7]]), torch.tensor([3])), ref)
        check_decode_layers()


def test_falls_back_where_it_cannot_run(monkeypatch, capsys):
    """Off Triton (plain CPU) and for a batch: use_persistent says why and the step stays per projection."""
    model = odd_model("fp32")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not model.use_persistent() and not model.persistent
    assert "no Triton device" in capsys.readouterr().err
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model.setup_caches(2, 16)
    assert not model.use_persistent()
    assert "one sequence only" in capsys.readouterr().err


def test_benchmark_decode_persistent_rows(tmp_path):
    """--persistent: each format's persistent rows and fixed cost beside the per-projection ones;
    the same tokens pass the same thresholds, so the measured sparsity is the same."""
    out = tmp_path / "bench"
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "scripts.benchmark_decode", "--model", "tiny", "--device", "cpu", "--no-compile",
                           "--weights", "int8", "--sparsities", "0.5", "--new-tokens", "4", "--runs", "1", "--persistent",
                           "--calibration-windows", "2", "--calibration-length", "32", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["int8 t=0 (sparse kernels)", "int8 sparse 0.5", "int8 persistent t=0", "int8 persistent 0.5"]
    assert rows["int8 persistent 0.5"]["measured_sparsity"] == rows["int8 sparse 0.5"]["measured_sparsity"] > 0
    assert {"int8", "int8 persistent"} <= set(result["fixed_costs"])
    assert "| int8 persistent |" in out.with_suffix(".md").read_text()
