"""generate.py as a user runs it: a tiny checkpoint end to end, and every bad input ending in one
clear line and a non-zero exit."""
import json
import shutil

import pytest
import torch

import generate
import thresholds
from checkpoint import save
from model import ModelArgs, Transformer
from tokenizer import PATTERNS, save_tokenizer

CHAT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random model with a byte-level tokenizer (token id = byte) and its thresholds file."""
    ckpt = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1.0 if "norm" in name or "embeddings" in name else 0.1)
        for proj in model.projections():
            proj.weight.data.normal_(0, proj.weight.in_features ** -0.5)
    meta = save(ckpt / "model.safetensors", model.canonical_weights(), model.config, "tiny-test")
    save_tokenizer(ckpt, "tiktoken", special_tokens={}, bos_id=None, eos_ids=[], add_bos=False, chat_template=CHAT,
                   pattern=PATTERNS["gpt2"], ranks={bytes([i]): i for i in range(256)})
    table = thresholds.calibrate(model, torch.randint(0, 256, (8, 64)), skip=8, refine=False)
    table.name, table.fingerprint = "tiny-test", meta["fingerprint"]
    table.save(ckpt / "thresholds.json")
    return ckpt


def run(capsys, *argv):
    """-> (exit code, stdout, stderr) of the command line, as `python generate.py ...` runs it."""
    code = 0
    try:
        generate.cli(generate.main, [*map(str, argv)])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_generates_with_measured_sparsity(checkpoint, capsys):
    code, out, err = run(capsys, "--checkpoint", checkpoint, "--sparsity", 0.5, "--prompt", "hello", "--max-new-tokens", 12, "--device", "cpu")
    assert code == 0, err
    assert "thresholds for sparsity 0.5" in err
    measured = float(err.split("measured sparsity ")[1].split()[0])
    assert 0.35 < measured < 0.65  # calibrated on random tokens, measured on what it generates
    assert "tok/s" in err


def test_dense_and_chat(checkpoint, capsys):
    code, out, err = run(capsys, "--checkpoint", checkpoint, "--chat", "--prompt", "hi", "--max-new-tokens", 4,
                         "--num-samples", 2, "--temperature", 0, "--device", "cpu")
    assert code == 0, err
    assert "measured sparsity 0.000" in err and "[sample 2]" in err


def truncated(checkpoint, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    return bad


def other_model_thresholds(checkpoint, tmp_path):
    doc = json.loads((checkpoint / "thresholds.json").read_text())
    doc["fingerprint"] = "0123456789abcdef"
    path = tmp_path / "other.json"
    path.write_text(json.dumps(doc))
    return path


BAD = {
    "missing checkpoint": (lambda c, t: ["--checkpoint", t / "nowhere"], "checkpoint not found"),
    "corrupt checkpoint": (lambda c, t: ["--checkpoint", truncated(c, t)], "is corrupt"),
    "not a checkpoint": (lambda c, t: ["--checkpoint", c / "thresholds.json"], "not a safetensors file"),
    "other model's thresholds": (lambda c, t: ["--checkpoint", c, "--sparsity", 0.5, "--thresholds", other_model_thresholds(c, t)], "not this checkpoint"),
    "sparsity above 1": (lambda c, t: ["--checkpoint", c, "--sparsity", 1.2], "--sparsity must be in [0, 1)"),
    "negative sparsity": (lambda c, t: ["--checkpoint", c, "--sparsity", -0.1], "--sparsity must be in [0, 1)"),
    "prompt longer than the cache": (lambda c, t: ["--checkpoint", c, "--prompt", "x" * 200], "exceeds the model's 128-token context"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_clear_line(case, checkpoint, tmp_path, capsys):
    argv, message = BAD[case]
    code, out, err = run(capsys, *argv(checkpoint, tmp_path), "--device", "cpu", "--max-new-tokens", 4)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for machines without a GPU")
def test_cuda_without_gpu(checkpoint, capsys):
    code, out, err = run(capsys, "--checkpoint", checkpoint, "--device", "cuda")
    assert code == 1 and err.strip() == "error: --device cuda asked for, but no CUDA GPU is available"
