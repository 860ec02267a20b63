"""generate.py as a user runs it: a tiny checkpoint end to end, and every bad input ending in one
clear line and a non-zero exit."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

import generate
from tests.helpers import CHAT, REPO, tiny_checkpoint
from tokenizer import PATTERNS, load_tokenizer, save_tokenizer

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


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
    assert "measured sparsity 0.000" in err and "[sample 2: " in err


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
    "empty prompt": (lambda c, t: ["--checkpoint", c, "--prompt", ""], "--prompt is empty"),
    "negative top-k": (lambda c, t: ["--checkpoint", c, "--top-k", -5], "--top-k must be 0"),
    "NaN temperature": (lambda c, t: ["--checkpoint", c, "--temperature", "nan"], "--temperature must be a number >= 0"),
    "unknown device": (lambda c, t: ["--checkpoint", c, "--device", "foo"], "is not a device"),
    "device without a kernel": (lambda c, t: ["--checkpoint", c, "--device", "mps"], "runs on cpu or cuda only"),
    "missing thresholds file, dense": (lambda c, t: ["--checkpoint", c, "--thresholds", t / "missing.json"], "thresholds file not found"),
    "sparsity above the file's range": (lambda c, t: ["--checkpoint", c, "--sparsity", 0.97], "above the uniform thresholds' range, [0, 0.95]"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_clear_line(case, checkpoint, tmp_path, capsys):
    argv, message = BAD[case]
    code, out, err = run(capsys, "--device", "cpu", "--max-new-tokens", 4, *argv(checkpoint, tmp_path))
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err
    assert "Traceback" not in err


def test_greedy_sparsity_above_its_rows_names_the_flag_to_use(smollm2_dir, capsys):
    code, out, err = run(capsys, "--checkpoint", smollm2_dir, "--sparsity", 0.93, "--device", "cpu")
    assert code == 1 and "above the greedy thresholds' range" in err and "--method uniform reaches 0.95" in err


def test_one_new_token_runs_no_decode_step(checkpoint, capsys):
    code, out, err = run(capsys, "--checkpoint", checkpoint, "--sparsity", 0.5, "--max-new-tokens", 1, "--device", "cpu")
    assert code == 0, err
    assert "no decode step" in err and "measured sparsity 1.000" not in err


def test_raw_mode_echoes_the_prompt(checkpoint, capsys):
    code, out, err = run(capsys, "--checkpoint", checkpoint, "--prompt", "hello", "--max-new-tokens", 3, "--device", "cpu")
    assert code == 0 and out.startswith("hello")
    code, out, err = run(capsys, "--checkpoint", checkpoint, "--chat", "--prompt", "hello", "--max-new-tokens", 3, "--device", "cpu")
    assert code == 0 and not out.startswith("hello")


def test_compare_shows_dense_then_sparse(checkpoint, capsys):
    code, out, err = run(capsys, "--checkpoint", checkpoint, "--sparsity", 0.5, "--compare", "--temperature", 0,
                         "--max-new-tokens", 6, "--device", "cpu")
    assert code == 0, err
    dense, sparse = err.index("[dense: "), err.index("[sparse 0.5: ")
    assert dense < sparse and "measured sparsity 0.000 (dense)" in err[dense:sparse]


def test_compile_on_the_cpu_leaves_the_sparse_step_eager(checkpoint, capsys):
    """Compiled, the CPU's sparse step is slower than eager (README, CPU): --compile says so, compiles
    nothing for it, and the same greedy tokens come out."""
    args = ("--checkpoint", checkpoint, "--sparsity", 0.5, "--temperature", 0, "--prompt", "hello", "--max-new-tokens", 6,
            "--device", "cpu")
    code, eager, _ = run(capsys, *args)
    assert code == 0
    code, out, err = run(capsys, *args, "--compile")
    assert code == 0, err
    assert "the sparse decode step stays eager" in err and "Compiled the decode step" not in err
    assert out == eager


def test_every_flag_says_what_it_does_and_its_default():
    parser = generate.arg_parser()
    text = " ".join(parser.format_help().split())  # unwrapped
    for action in parser._actions:
        assert action.help, action.dest
        if action.default not in (None, False, "==SUPPRESS=="):
            assert "default" in action.help or f"(default: {action.default})" in text, action.dest
    assert "(default: 0.8)" in text and "(default: 200)" in text


@pytest.fixture(scope="module")
def special_tokenizer(tmp_path_factory):
    """Byte-level, with one special token: <|end|>, id 255 (byte 255 never occurs in UTF-8)."""
    path = tmp_path_factory.mktemp("special")
    save_tokenizer(path, "tiktoken", special_tokens={"<|end|>": 255}, bos_id=None, eos_ids=[], add_bos=False, chat_template=CHAT,
                   pattern=PATTERNS["gpt2"], ranks={bytes([i]): i for i in range(255)})
    return load_tokenizer(path)


def test_a_special_token_ends_the_output_and_is_not_printed(special_tokenizer, capsys):
    streamed = generate.Streamer(special_tokenizer)
    assert [streamed(torch.tensor([[t]])) for t in b"hi"] == [False, False]
    assert streamed(torch.tensor([[255]])) is True
    assert streamed.finish() == "hi" and "<|end|>" not in capsys.readouterr().out


def test_a_special_token_typed_in_a_message_is_text(special_tokenizer):
    ids = special_tokenizer.encode_chat([{"role": "user", "content": "say <|end|> now"}])
    assert 255 not in ids and "<|end|>" in special_tokenizer.decode(ids)
    assert special_tokenizer.encode("say <|end|> now").count(255) == 1  # plain text keeps its specials


class ScriptedRun:
    """Stands in for generate.Run in the chat loop: records the prompts, replies "ok"; the reply to
    a message "stop" is interrupted as Ctrl-C would interrupt it."""

    def __init__(self, tokenizer):
        self.tokenizer, self.args, self.prompts, self.last_text = tokenizer, type("A", (), {"max_new_tokens": 4}), [], ""

    def reply(self, ids, sparse, label=None, echo=False):
        self.prompts.append(self.tokenizer.decode(ids))
        if self.prompts[-1].rstrip().endswith("user: stop\nassistant:"):
            self.last_text = "partial"
            raise KeyboardInterrupt
        return "ok"


def lines(*typed):
    """A read() for the chat loop: the typed lines, then Ctrl-D."""
    it = iter(typed)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


def test_chat_skips_empty_lines_stops_a_reply_on_ctrl_c_and_quits(special_tokenizer, capsys):
    run = ScriptedRun(special_tokenizer)
    generate.chat(run, True, 128, lines("hello", "", "   ", "stop", "again", "/quit", "never read"))
    assert len(run.prompts) == 3  # hello, stop (interrupted), again: no empty ones, nothing after /quit
    assert "assistant: partial" in run.prompts[2]  # the interrupted reply stays in the conversation
    err = capsys.readouterr().err
    assert "/quit or Ctrl-D" in err and "[stopped]" in err and "sample" not in err
    generate.chat(ScriptedRun(special_tokenizer), True, 128, lines("hi"))  # Ctrl-D: returns


def test_interactive_through_stdin(checkpoint):
    done = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(checkpoint), "--interactive", "--device", "cpu",
                           "--max-new-tokens", "3"], cwd=REPO, input="hello\n\n/quit\n", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # Prompted for hello, the empty line and /quit; one reply, the empty line sent nowhere.
    assert done.stdout.count("You: ") == 3 and done.stderr.count("[3 tokens in") == 1 and "sample" not in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for machines without a GPU")
def test_cuda_without_gpu(checkpoint, capsys):
    code, out, err = run(capsys, "--checkpoint", checkpoint, "--device", "cuda")
    assert code == 1 and err.strip() == "error: --device cuda asked for, but no CUDA GPU is available"
