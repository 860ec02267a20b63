"""scripts/accuracy_report.py --weights: perplexity by weight format, its JSON and its resumption, on
a tiny random checkpoint; and the committed report of the bundled model."""
import hashlib
import json
import math

import pytest
import torch

import checkpoint
import quantize
import thresholds
from generate import cli
from scripts import accuracy_report
from scripts.common import text_windows
from tests.helpers import REPO, SHIPPED, tiny_checkpoint
from tokenizer import load_tokenizer

TEXT = str(REPO / "README.md")
REPORT = "accuracy_weights_tiny-test.json"
PERPLEXITY = thresholds.perplexity


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random checkpoint whose thresholds file has greedy rows (searched on README bytes)."""
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny")
    model, meta = checkpoint.load(ckpt / "model.safetensors")
    table = thresholds.load(ckpt / "thresholds.json", fingerprint=meta["fingerprint"])
    windows = torch.tensor(list((REPO / "README.md").read_bytes()[:4 * 64])).view(4, 64)
    table.greedy, table.greedy_thresholds, table.greedy_error = thresholds.greedy.greedy_search(model, windows, table, 16, step=0.05)
    table.save(ckpt / "thresholds.json")
    return ckpt


def report(ckpt, out, *args):
    accuracy_report.main(["--checkpoint", str(ckpt), "--text", TEXT, "--windows", "2", "--device", "cpu", "--out-dir", str(out), *args])
    return json.loads((out / REPORT).read_text())


def counting(monkeypatch, interrupt_at=None):
    """thresholds.perplexity as the report calls it, recording the number of settings of each call
    (and raising KeyboardInterrupt at call number interrupt_at)."""
    calls = []

    def perplexity(model, windows, settings, **kwargs):
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        calls.append(len(settings))
        return PERPLEXITY(model, windows, settings, **kwargs)

    monkeypatch.setattr(thresholds, "perplexity", perplexity)
    return calls


def test_weights_report_cells_and_resumption(tiny, tmp_path, monkeypatch):
    calls = counting(monkeypatch, interrupt_at=1)
    with pytest.raises(KeyboardInterrupt):  # during the second format: the first's cells are saved
        report(tiny, tmp_path, "--weights", "bf16", "int4-g32", "--sparsities", "0.5")
    doc = json.loads((tmp_path / REPORT).read_text())
    assert [(r["weights"], r["sparsity"]) for r in doc["results"]] == [("bf16", 0.0), ("bf16", 0.5)]

    calls = counting(monkeypatch)
    doc = report(tiny, tmp_path, "--weights", "bf16", "int4-g32", "--sparsities", "0.5")
    assert calls == [2]  # only int4-g32's two cells ran
    assert [(r["weights"], r["sparsity"]) for r in doc["results"]] == [("bf16", 0.0), ("bf16", 0.5), ("int4-g32", 0.0), ("int4-g32", 0.5)]
    assert (doc["window_length"], doc["scored"], doc["tokens_scored"], doc["dtype"]) == (128, 32, 64, "fp32")
    assert doc["formats"]["int4-g32"]["quantization"] == {"mode": "int4", "group_size": 32}
    assert doc["formats"]["bf16"] == {"fingerprint": checkpoint.read_metadata(tiny / "model.safetensors")["fingerprint"],
                                      "quantization": None}
    by = {(r["weights"], r["sparsity"]): r for r in doc["results"]}
    for w in ("bf16", "int4-g32"):
        assert by[(w, 0.0)]["measured"] < 0.01 < by[(w, 0.5)]["measured"] < 0.9
        assert math.isclose(math.log(by[(w, 0.5)]["ppl"]), by[(w, 0.5)]["nll"], rel_tol=1e-9)
    assert by[("int4-g32", 0.0)]["nll"] != by[("bf16", 0.0)]["nll"]  # the int4 weights are the ones that ran
    assert "| int4-g32 |" in (tmp_path / REPORT).with_suffix(".md").read_text()
    assert (tmp_path / REPORT).with_suffix(".png").stat().st_size > 0

    # The int4 cells are the quantized checkpoint's perplexity, derived beside the source.
    derived = tiny.with_name(tiny.name + quantize.suffix("int4", 32))
    model, _ = checkpoint.load(derived / "model.safetensors")
    _, windows = text_windows(load_tokenizer(tiny), [TEXT], 2, 129)
    table = thresholds.load(tiny / "thresholds.json")
    direct = PERPLEXITY(model, windows, [table.at(0.5, "greedy")], scored=32)[0]
    assert math.isclose(direct["nll"], by[("int4-g32", 0.5)]["nll"], rel_tol=1e-6)

    # A rerun computes nothing; a new sparsity computes only its cells, one call per format.
    calls = counting(monkeypatch)
    assert report(tiny, tmp_path, "--weights", "bf16", "int4-g32", "--sparsities", "0.5")["results"] == doc["results"]
    assert calls == []
    doc = report(tiny, tmp_path, "--weights", "bf16", "int4-g32", "--sparsities", "0.3,0.5")
    assert calls == [1, 1] and len(doc["results"]) == 6 and doc["sparsities"] == [0.0, 0.3, 0.5]


def test_weights_report_refuses_cells_of_other_settings(tiny, tmp_path, capsys):
    report(tiny, tmp_path, "--weights", "bf16", "--sparsities", "0.5")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        cli(accuracy_report.main, ["--checkpoint", str(tiny), "--text", TEXT, "--windows", "3", "--device", "cpu", "--weights", "bf16",
                                   "--out-dir", str(tmp_path)])
    assert exit.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / REPORT} holds cells of other settings (windows: 2, now 3); delete it or choose another --out-dir"]


def test_unknown_weight_format_gives_one_line(capsys):
    with pytest.raises(SystemExit) as exit:
        cli(accuracy_report.main, ["--weights", "int4-g16", "--text", TEXT])
    assert exit.value.code == 1 and capsys.readouterr().err.strip().splitlines() == [
        "error: --weights: unknown format 'int4-g16' (choose from bf16, int8, int4-g32, int4-g64, int4-g128)"]



def test_committed_weights_report_is_of_the_shipped_file_and_int8_keeps_bf16s_perplexity():
    """The committed report was made from the shipped thresholds file as it is now, and int8's
    perplexity is within 1% of bf16's at every sparsity."""
    doc = json.loads((REPO / "benchmarks" / "results" / "accuracy_weights_smollm2-135m-instruct.json").read_text())
    assert doc["thresholds_sha256"] == hashlib.sha256(SHIPPED.read_bytes()).hexdigest()[:16], f"stale report: rerun {doc['command']}"
    by = {(r["weights"], r["sparsity"]): r for r in doc["results"]}
    assert {w for w, _ in by} == set(accuracy_report.WEIGHTS) and doc["sparsities"] == [0.0, 0.25, 0.4, 0.5]
    for s in doc["sparsities"]:
        assert abs(by[("int8", s)]["ppl"] / by[("bf16", s)]["ppl"] - 1) < 0.01, s
        assert abs(by[("int8", s)]["measured"] - s) < 0.01, s
