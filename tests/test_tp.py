"""Tensor parallelism on the CPU (gloo): N processes decode as one does, dense and sparse, in every
weight format; launches that cannot work are refused with one line."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import checkpoint
import generate
import thresholds
import tp
from model import ModelArgs, Transformer
from quantize import quantize_tensors
from tests.helpers import SHIPPED, tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
# Whole GQA groups of 2 q heads, and int4 groups of 32 whole on each of 2 ranks (o: 32 inputs a rank, down: 64).
CONFIG = ModelArgs(dim=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=128, vocab_size=256, block_size=128)
FORMATS = (("fp32", None), ("int8", None), ("int4", 32))
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
NEW_TOKENS = 8


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decode(model, sparse_thresholds, new_tokens=NEW_TOKENS):
    """Greedy decode of PROMPT at each sparsity's thresholds (0: the dense matmuls) -> {sparsity:
    (logits of every step, tokens, measured sparsity)}: the prefill's logits first, then each step's."""
    out = {}
    for sparsity, t in sparse_thresholds.items():
        model.set_thresholds(t)
        model.setup_caches(1, len(PROMPT) + new_tokens)
        model.record_sparsity(sparsity > 0)
        logits = [model(torch.tensor([PROMPT]), torch.arange(len(PROMPT)))[:, -1]]
        tokens = [int(logits[-1].argmax())]
        for pos in range(len(PROMPT), len(PROMPT) + new_tokens - 1):
            logits.append(model(torch.tensor([[tokens[-1]]]), torch.tensor([pos]), sparse=sparsity > 0)[:, -1])
            tokens.append(int(logits[-1].argmax()))
        out[sparsity] = (torch.cat(logits), tokens, model.measured_sparsity())
    model.set_thresholds(torch.zeros(model.config.n_layer, 7))
    model.record_sparsity(False)
    return out


def run_all(checkpoints, sparse_thresholds, new_tokens=NEW_TOKENS):
    """{checkpoint's directory name: decode's result} with this process's world (tp.load cuts the shards)."""
    with torch.no_grad():
        return {c.parent.name: decode(tp.load(c)[0], sparse_thresholds, new_tokens) for c in checkpoints}


def compiled_tokens(path, t, new_tokens=NEW_TOKENS):
    """Greedy tokens after PROMPT at thresholds t through the decode step compiled whole
    (fullgraph: the all-reduces inside the graph; aot_eager, to keep the CPU compile short)."""
    model = tp.load(path)[0]
    model.set_thresholds(t)
    model.setup_caches(1, len(PROMPT) + new_tokens)
    step = torch.compile(generate.decode_one_token, fullgraph=True, backend="aot_eager")
    return generate.generate(model, torch.tensor(PROMPT, dtype=torch.int), new_tokens, step)[len(PROMPT):].tolist()


def worker(rank, world, port, checkpoints, sparse_thresholds, new_tokens, out, interpret, compile_case):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)  # as torchrun sets it: the ranks share the machine's cores
    tp.init("cpu")
    result = run_all(checkpoints, sparse_thresholds, new_tokens)
    if compile_case:
        result["compiled"] = compiled_tokens(*compile_case, new_tokens)
    if rank == 0:
        torch.save(result, out)
    tp.end(0)  # as a command's rank ends: a plain return let gloo's threads abort the exit


def spawn(world, checkpoints, sparse_thresholds, tmp_path, new_tokens=NEW_TOKENS, interpret=False, compile_case=None):
    """run_all's results on rank 0 of world processes (gloo), each holding its shard; with
    compile_case (checkpoint, thresholds), also compiled_tokens' (key "compiled")."""
    out = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(world, free_port(), checkpoints, sparse_thresholds, new_tokens, out, interpret, compile_case),
             nprocs=world)
    return torch.load(out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random checkpoint of CONFIG in fp32, int8 and int4 (quantized from it), and thresholds at 0
    and 50% (calibrated on random tokens)."""
    root = tmp_path_factory.mktemp("tp")
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1.0 if "norm" in name or "embeddings" in name else 0.1)
        for proj in model.projections():
            proj.weight.data.normal_(0, proj.weight.in_features ** -0.5)
    table = thresholds.calibrate(model, torch.randint(0, 256, (8, 64)), skip=8, refine=False)
    tensors, paths = model.canonical_weights(), []
    for fmt, group in FORMATS:
        path = root / fmt / "model.safetensors"
        quantization = dict(mode=fmt, group_size=group) if group or fmt == "int8" else None
        checkpoint.save(path, quantize_tensors(tensors, fmt, group) if quantization else tensors, CONFIG, f"tp-{fmt}", quantization)
        paths.append(path)
    return paths, {0.0: torch.zeros(CONFIG.n_layer, 7), 0.5: table.at(0.5)}


def assert_same(one, many):
    for name in one:
        for sparsity, (logits, tokens, measured) in one[name].items():
            logits_n, tokens_n, measured_n = many[name][sparsity]
            where = f"{name} at {sparsity}"
            assert tokens_n == tokens, where
            # The all-reduce adds the ranks' partial sums in another order than one process's sum: fp32
            # rounding, grown over the layers (the bundled model's 30: 2.4e-6 of its largest logit).
            torch.testing.assert_close(logits_n, logits, rtol=1e-5, atol=1e-5 * float(logits.abs().max()), msg=where)
            if sparsity:
                assert torch.equal(measured_n, measured), where
                assert (measured.mean(0) > 0.3).all(), where  # the thresholds did something


def test_two_ranks_decode_as_one_process(tiny, tmp_path):
    """fp32, int8 and int4 shards, dense and at 50%: the same logits (to fp32 rounding), greedy
    tokens and measured sparsity as one process; the compiled step (int4, 50%) the same tokens."""
    paths, sparse_thresholds = tiny
    one = run_all(paths, sparse_thresholds)
    many = spawn(2, paths, sparse_thresholds, tmp_path, compile_case=(paths[-1], sparse_thresholds[0.5]))
    assert many.pop("compiled") == one["int4"][0.5][1]
    assert_same(one, many)


def test_two_ranks_through_the_triton_kernels(tiny, tmp_path, monkeypatch):
    """The kernels on shards (interpreted): fused norm and SwiGLU prologues, kept counts, decode
    attention over the rank's kv heads; int4, the format whose row-parallel shards cut scales."""
    paths, sparse_thresholds = tiny
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    case = [p for p in paths if p.parent.name == "int4"], {0.5: sparse_thresholds[0.5]}
    assert_same(run_all(*case, new_tokens=3), spawn(2, *case, tmp_path, new_tokens=3, interpret=True))


def test_bundled_model_on_three_ranks(smollm2, smollm2_dir, tmp_path):
    """Its 3 kv heads go one to a rank; its shipped thresholds at 50%."""
    table = thresholds.load(SHIPPED)
    sparse_thresholds = {0.0: torch.zeros(30, 7), 0.5: table.at(0.5)}
    with torch.no_grad():
        one = {smollm2_dir.name: decode(smollm2[0], sparse_thresholds, new_tokens=3)}
    assert_same(one, spawn(3, [smollm2_dir / "model.safetensors"], sparse_thresholds, tmp_path, new_tokens=3))


def torchrun(n, *argv, input=None):
    """-> the finished `torchrun --nproc_per_node n ARGV` (python ARGV[0] or -m ARGV[1]) in the
    repository, fed input on stdin (which every rank inherits)."""
    # --standalone: torchrun's own rendezvous on a free port of this host.
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *map(str, argv)],
                          cwd=REPO, input=input, capture_output=True, text=True)


def test_torchrun_generate_prints_once_what_one_process_prints(tmp_path, capsys):
    """generate.py as users launch it: rank 0 streams the text and the report, rank 1 nothing; the
    text and the measured sparsity are one process's."""
    ckpt = tiny_checkpoint(tmp_path)
    argv = ["--checkpoint", ckpt, "--sparsity", 0.5, "--temperature", 0, "--prompt", "hello", "--max-new-tokens", 12, "--device", "cpu"]
    generate.cli(generate.main, [*map(str, argv)])
    one_out, one_err = capsys.readouterr()
    done = torchrun(2, "generate.py", *argv)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == one_out
    assert done.stderr.count("Loaded tiny-test") == 1
    measured = lambda err: err.split("measured sparsity ")[1].split(")")[0]
    assert measured(done.stderr) == measured(one_err)


def test_torchrun_interactive_chat_reads_on_rank_0(tmp_path):
    """Rank 0 reads the terminal and hands each line to the others: one reply, then /quit ends every rank."""
    done = torchrun(2, "generate.py", "--checkpoint", tiny_checkpoint(tmp_path), "--interactive", "--device", "cpu",
                    "--max-new-tokens", 3, input="hello\n/quit\n")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("You: ") == 2 and done.stderr.count("[3 tokens in") == 1


@pytest.fixture(scope="module")
def tiny_int4(tmp_path_factory):
    """The tiny config in int4, groups of 32: down's 96 inputs are 48 a rank on 2 ranks."""
    source = tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    tensors, meta = checkpoint.read_tensors(source)
    path = tmp_path_factory.mktemp("tiny-int4") / "model.safetensors"
    checkpoint.save(path, quantize_tensors(tensors, "int4", 32), checkpoint.config_of(meta), "tiny-int4", dict(mode="int4", group_size=32))
    return path


@pytest.mark.parametrize("case, error", [
    ("smollm2_dir", "2 ranks do not divide the model's 3 kv heads and 1536 intermediate columns: run 1, 3 processes"),
    ("tiny_int4", "int4 groups of 32 input channels do not split down's 96 inputs over 2 ranks (48 a rank): "
                  "quantize with a smaller --group-size or use fewer ranks"),
])
def test_a_shard_that_cannot_be_cut_is_one_line(case, error, request):
    done = torchrun(2, "generate.py", "--checkpoint", request.getfixturevalue(case), "--device", "cpu", "--max-new-tokens", 2)
    assert done.returncode != 0
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [f"error: {error}"]
    assert "Traceback" not in done.stderr.split("error:")[0]  # none from the ranks (torchrun reports the exit after)


def test_int4_shards_must_hold_whole_groups():
    with pytest.raises(tp.PlacementError, match=r"down's 96 inputs over 2 ranks \(48 a rank\)"):
        tp.check_groups(ModelArgs.from_name("tiny"), 2, 32)
    with pytest.raises(tp.PlacementError, match=r"o's 64 inputs over 2 ranks \(32 a rank\)"):
        tp.check_groups(CONFIG, 2, 64)
    tp.check_groups(CONFIG, 2, 32)


def test_memory_needed_is_known_before_loading(tiny):
    """The bytes of a model built on the meta device are those of the loaded one; a GPU without them
    gets one line naming them. Llama-3-70B in int8: its 70 GB of projections plus bf16 embeddings
    and head fit one H200."""
    for path in tiny[0]:
        meta = checkpoint.read_metadata(path)
        fmt = checkpoint.weight_format(checkpoint.quantization_of(meta))
        with torch.device("meta"):
            shape = tp.build(CONFIG, **fmt)
        assert tp.model_bytes(shape) == tp.model_bytes(tp.load(path)[0])
    with torch.device("meta"):
        big = tp.model_bytes(tp.build(ModelArgs.from_name("llama-3-70b"), torch.bfloat16, fmt="int8"))
    assert 70e9 < big < 80e9
    with pytest.raises(tp.PlacementError, match=rf"llama-3-70b needs {big / 1e9:.1f} GB of GPU memory .* cuda:0 has 40.0 GB free"):
        tp.check_memory(big, 40e9, "llama-3-70b", "cuda:0", 1)
    tp.check_memory(big, 141e9, "llama-3-70b", "cuda:0", 1)


def test_benchmark_decode_under_torchrun(tmp_path):
    """The decode benchmark on 2 ranks (gloo): rows for dense and 50%, each with its step's all-reduce
    time; rank 0 writes the results."""
    out = tmp_path / "bench"
    done = torchrun(2, "-m", "scripts.benchmark_decode", "--model", "tiny", "--device", "cpu", "--no-compile", "--sparsities", 0.5,
                    "--new-tokens", 4, "--runs", 1, "--calibration-windows", 2, "--calibration-length", 32, "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["world_size"] == 2
    assert [r["variant"] for r in result["rows"]] == ["bf16 dense (torch)", "bf16 t=0 (sparse kernels)", "bf16 sparse 0.5"]
    assert all(r["all_reduce_us_per_step"] > 0 and r["tok_s"] > 0 for r in result["rows"])
    assert all(0.3 < r["measured_sparsity"] < 0.7 for r in result["rows"] if r["target_sparsity"] == 0.5)
    assert done.stdout.count("| variant | target |") == 1  # the rows table, printed by rank 0 alone
