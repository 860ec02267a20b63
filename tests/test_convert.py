"""The converters, run as a user runs them: Hugging Face round trips on tiny random models, the
bundled GGUF against transformers' own GGUF loader, and bad inputs."""
import json
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import checkpoint
from checkpoint import CheckpointError
from model import ModelArgs, Transformer
from tokenizer import PATTERNS, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
# The thresholds shipped for the default model are tied to this: a converter change that moves it
# needs new thresholds.
DEFAULT_FINGERPRINT = "e8531d4ee9859a97"

transformers = pytest.importorskip("transformers", reason="transformers is the reference model")


def run(script, *args):
    return subprocess.run([sys.executable, f"scripts/{script}", *map(str, args)], cwd=REPO, capture_output=True, text=True)


def text_sample():
    return ("The 3 ships left port on 12 March 1851, at   7:45;  by the 20th only 2 remained.\n\tShe'd said they'll"
            " be back by 1852.\n\n" + json.__doc__)


# Hugging Face round trips

def save_bpe_tokenizer(hf_dir):
    """A tiny Llama-3-style byte-level BPE (regex split, then ByteLevel) as tokenizer.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PATTERNS["llama3"]), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text_sample()] * 4, trainer)
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(dict(
        bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", add_bos_token=True,
        chat_template="{% for m in messages %}<|begin_of_text|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")))
    return tok


def save_sentencepiece_tokenizer(hf_dir):
    spm = pytest.importorskip("sentencepiece")
    lines = [line for line in text_sample().splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines * 4), model_prefix=str(hf_dir / "tokenizer"), vocab_size=500,
                                   model_type="bpe", byte_fallback=True, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    (hf_dir / "tokenizer.vocab").unlink()
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(dict(bos_token="<s>", eos_token="</s>", add_bos_token=True)))
    return spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))


def save_hf_model(hf_dir, name, dtype):
    """transformers' Llama for a config of model.py's table, random weights, saved as safetensors."""
    args = ModelArgs.from_name(name)
    config = transformers.LlamaConfig(
        hidden_size=args.dim, num_hidden_layers=args.n_layer, num_attention_heads=args.n_head,
        num_key_value_heads=args.n_kv_head, intermediate_size=args.intermediate_size, vocab_size=args.vocab_size,
        max_position_embeddings=args.block_size, rope_theta=args.rope_base, rms_norm_eps=args.norm_eps,
        tie_word_embeddings=args.tie_embeddings,
        rope_scaling=dict(rope_type="llama3", **args.rope_scaling) if args.rope_scaling else None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.to(dtype).save_pretrained(hf_dir)
    return model.eval(), args


@pytest.mark.parametrize("name, dtype, kind", [("tiny-tied", torch.float32, "tokenizer.json"),
                                               ("tiny-llama31", torch.bfloat16, "sentencepiece")])
def test_hf_round_trip(tmp_path, name, dtype, kind):
    hf_dir, out = tmp_path / "hf-model", tmp_path / "out"
    hf, args = save_hf_model(hf_dir, name, dtype)
    reference = save_bpe_tokenizer(hf_dir) if kind == "tokenizer.json" else save_sentencepiece_tokenizer(hf_dir)

    done = run("convert_hf_checkpoint.py", "--hf", hf_dir, "--out", out)
    assert done.returncode == 0, done.stderr
    model, meta = checkpoint.load(out / "model.safetensors")
    assert ModelArgs(**json.loads(meta["config"])) == args
    assert (meta["name"], meta["source"]) == ("hf-model", "hf-model")
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("layers.0.attention.q.weight").dtype == dtype  # bf16 stays bf16
    idx = torch.randint(0, args.vocab_size, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = float((model(idx) - hf.float()(idx).logits).abs().max())
    assert diff < 1e-4

    tok, text = load_tokenizer(out), text_sample()
    expected = reference.encode(text).ids if kind == "tokenizer.json" else reference.encode(text)
    assert tok.encode(text) == expected
    assert tok.decode(tok.encode(text)) == text
    assert tok.add_bos and tok.bos_id == (0 if kind == "tokenizer.json" else 1)


def test_hf_force_converts_again(tmp_path):
    hf_dir, out = tmp_path / "hf", tmp_path / "out"
    save_hf_model(hf_dir, "tiny", torch.bfloat16)
    save_bpe_tokenizer(hf_dir)
    assert run("convert_hf_checkpoint.py", "--hf", hf_dir, "--out", out).returncode == 0
    before = checkpoint.read_metadata(out / "model.safetensors")["fingerprint"]
    forced = run("convert_hf_checkpoint.py", "--hf", hf_dir, "--out", out, "--dtype", "fp32", "--force")
    assert forced.returncode == 0, forced.stderr
    assert checkpoint.read_metadata(out / "model.safetensors")["fingerprint"] != before  # now fp32


def test_corrupt_or_truncated_checkpoint(tmp_path):
    ckpt = tmp_path / "model.safetensors"
    model = Transformer(ModelArgs.from_name("tiny"))
    checkpoint.save(ckpt, model.canonical_weights(), model.config, "tiny")
    data = ckpt.read_bytes()
    for broken in (data[:len(data) // 2], data[:100], b"\x00" * 64):
        ckpt.write_bytes(broken)
        with pytest.raises(CheckpointError) as e:
            checkpoint.load(ckpt)
        assert "\n" not in str(e.value)


# Bad inputs: one line on stderr, exit code 1, no traceback, nothing written

def write_gguf(path, arch):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(path, arch)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def truncated_hf_dir(path):
    save_hf_model(path, "tiny", torch.float32)
    save_bpe_tokenizer(path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:len(data) // 2])


def unsupported_hf_dir(path):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))


BAD_INPUTS = {
    "gguf missing": ("convert_gguf.py", "--gguf", lambda p: None, "not found"),
    "not a gguf": ("convert_gguf.py", "--gguf", lambda p: p.write_text("hello"), "not a readable GGUF"),
    "gguf of another architecture": ("convert_gguf.py", "--gguf", lambda p: write_gguf(p, "gpt2"), "unsupported architecture"),
    "hf unsupported model": ("convert_hf_checkpoint.py", "--hf", unsupported_hf_dir, "unsupported architecture"),
    "hf truncated safetensors": ("convert_hf_checkpoint.py", "--hf", truncated_hf_dir, "safetensors"),
}


def test_bad_input_gives_one_line(tmp_path):
    runs = {}
    for i, (case, (script, flag, make, _)) in enumerate(BAD_INPUTS.items()):
        source, out = tmp_path / f"input{i}", tmp_path / f"out{i}"
        make(source)
        # all at once: each run is mostly Python starting up
        runs[case] = out, subprocess.Popen([sys.executable, f"scripts/{script}", flag, source, "--out", out], cwd=REPO,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for case, (out, proc) in runs.items():
        _, stderr = proc.communicate()
        assert proc.returncode == 1, (case, stderr)
        assert len(stderr.strip().splitlines()) == 1 and BAD_INPUTS[case][3] in stderr, (case, stderr)
        assert not out.exists(), case


# The bundled GGUF

def test_default_gguf_checkpoint(smollm2_dir):
    meta = checkpoint.read_metadata(smollm2_dir / "model.safetensors")
    assert json.loads(meta["config"]) == asdict(ModelArgs.from_name("smollm2-135m"))
    assert (meta["name"], meta["source"], meta["fingerprint"]) == ("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf", DEFAULT_FINGERPRINT)
    again = run("convert_gguf.py", "--out", smollm2_dir)
    assert again.returncode == 0 and "already" in again.stdout


@torch.no_grad()
def greedy(model, ids, n):
    """n greedy tokens after ids, decoding through the KV cache as generate.py does."""
    model.setup_caches(1, len(ids) + n)
    logits = model(torch.tensor([ids]), torch.arange(len(ids)))
    out = []
    for i in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[out[-1]]]), torch.tensor([len(ids) + i]))
    return out


def test_default_gguf_greedy_matches_transformers(smollm2_dir, bundled_gguf):
    pytest.importorskip("accelerate")
    gguf_path = bundled_gguf
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    model, _ = checkpoint.load(smollm2_dir / "model.safetensors")
    tok = load_tokenizer(smollm2_dir)
    prompts = ["The capital of France is", "def fibonacci(n):",
               tok.render_chat([{"role": "user", "content": "Name three primary colours."}])]
    for prompt in prompts:
        ids = tok.encode(prompt)
        ours = greedy(model, ids, 30)
        # transformers' greedy tokens are ours exactly when, fed ours, its argmax at every step is
        # our next token: one forward instead of 30 steps.
        with torch.no_grad():
            logits = hf(torch.tensor([ids + ours])).logits[0, len(ids) - 1:-1]
        theirs = logits.argmax(-1).tolist()
        assert theirs == ours, (prompt, tok.decode(ours), tok.decode(theirs))


def test_ctrl_c_ends_a_conversion_quietly_and_leaves_no_checkpoint(tmp_path, bundled_gguf):
    """SIGINT while dequantizing: one line, exit code 130, no traceback, no model.safetensors."""
    pytest.importorskip("gguf")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "scripts/convert_gguf.py", "--out", str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "dequantize" not in seen:  # the progress bar: conversion is under way
        seen += proc.stderr.read(1)
        assert seen or proc.poll() is None, "the converter ended before it started"
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in seen + rest and (seen + rest).strip().splitlines()[-1].endswith("interrupted")
    assert not (out / "model.safetensors").exists()
