"""int8 and int4 weights: round-to-nearest within its stated bound, canonical tensors that round
trip, and quantize.py as a user runs it (derived checkpoints, bad inputs)."""
import json

import pytest
import torch

import checkpoint
import thresholds
from generate import cli
from sparse_kernels import GROUP_SIZES, PackedWeight, pack_weight, quantize
import quantize as quantize_cli
from tests.helpers import tiny_checkpoint

SHAPES = [((333,), 1000), ((3, 5, 7), 129), ((1,), 3), ((64, 32, 32), 64), ((129,), 333)]


def groups_of(W, group_size):
    """[out, in] -> [out, n_groups, group_size], the last group padded with NaN."""
    out, k = W.shape
    pad = -k % group_size
    return torch.nn.functional.pad(W, (0, pad), value=float("nan")).view(out, -1, group_size)


@pytest.mark.parametrize("splits, k", SHAPES)
def test_int8_round_to_nearest_bound(splits, k):
    W = torch.randn(sum(splits), k) * 0.02
    W[0, 0] = 0.5  # an outlier sets its row's scale alone
    pw = pack_weight(W, "int8", splits)
    scale = W.abs().amax(dim=1, keepdim=True) / 127
    assert ((pw.dequantize() - W).abs() <= 0.5 * scale * (1 + 1e-4)).all()  # fp32 rounding of W / scale
    assert pw.data.dtype == torch.int8 and pw.data.shape == (k, sum(splits))


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("splits, k", SHAPES)
def test_int4_round_to_nearest_bound(splits, k, group_size):
    """Each entry within half a step of its group (the fp16 scale the kernel reads), one step at
    most for a group's extremes, the last partial group included; zero exact."""
    W = torch.randn(sum(splits), k) * 0.02
    W[:, -1] = 0.0
    pw = pack_weight(W, "int4", splits, group_size=group_size, dtype=torch.bfloat16)
    step = pw.scales.float().t()[..., None]  # [out, n_groups, 1]
    g = groups_of(W, group_size)
    err = groups_of(pw.dequantize() - W, group_size).abs().nan_to_num(0)
    inside = (g > g.nan_to_num(0).amin(-1, keepdim=True)) & (g < g.nan_to_num(0).amax(-1, keepdim=True))
    assert (err <= step * 0.5 * (1 + 1e-4)).logical_or(~inside).all()
    assert (err <= step * (1 + 1e-4)).all()
    assert (pw.dequantize()[:, -1] == 0).all()


@pytest.mark.parametrize("fmt, group_size", [("int8", None), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("splits, k", SHAPES)
def test_canonical_tensors_round_trip(fmt, group_size, splits, k):
    pw = pack_weight(torch.randn(sum(splits), k), fmt, splits, group_size=group_size, dtype=torch.float16)
    again = PackedWeight(sum(splits), k, fmt, splits, dtype=torch.float16, group_size=group_size).load(pw.canonical())
    assert torch.equal(again.dequantize(), pw.dequantize())
    assert all(torch.equal(a, b) for a, b in zip(again.canonical().values(), pw.canonical().values()))
    assert again.fmt == fmt and again.dtype == torch.float16


def test_quantized_canonical_tensors_are_a_fused_weights_segments():
    """Rows are quantized independently: quantizing q, k, v apart equals quantizing [q | k | v]."""
    W = torch.randn(48, 100)
    fused = quantize(W, "int4", 32)
    parts = [quantize(w, "int4", 32) for w in W.split([32, 8, 8])]
    assert all(torch.equal(fused[p], torch.cat([q[p] for q in parts])) for p in fused)


def test_bad_formats_are_refused():
    with pytest.raises(ValueError, match="group size"):
        pack_weight(torch.randn(8, 64), "int4", group_size=48)
    with pytest.raises(ValueError, match="unknown weight format"):
        pack_weight(torch.randn(8, 64), "int3")


# quantize.py

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("mode, group", [("int8", None), ("int4", 32)])
def test_quantize_writes_a_derived_checkpoint(tiny, tmp_path, mode, group):
    out = tmp_path / "q"
    cli(quantize_cli.main, ["--checkpoint", str(tiny), "--mode", mode, "--out", str(out)] + (["--group-size", str(group)] if group else []))
    source, meta = checkpoint.read_metadata(tiny), checkpoint.read_metadata(out)
    assert meta["source_fingerprint"] == source["fingerprint"] != meta["fingerprint"]
    assert meta["name"] == "tiny-test" + quantize_cli.suffix(mode, group)
    assert checkpoint.quantization_of(meta) == {"mode": mode, "group_size": group}
    # The source's thresholds apply, found beside the copy.
    found = thresholds.find_thresholds(out, checkpoint.lineage(meta))
    thresholds.load(found, fingerprint=checkpoint.lineage(meta), config=checkpoint.config_of(meta))
    model, _ = checkpoint.load(out)
    float_model, _ = checkpoint.load(tiny)
    for a, b in zip(model.projections(), float_model.projections()):
        assert a.weight.fmt == mode
        err = (a.weight.dequantize() - b.weight.dequantize()).norm() / b.weight.dequantize().norm()
        assert err < (0.01 if mode == "int8" else 0.15)
    assert (out / "tokenizer_config.json").is_file()


def test_quantize_again_is_a_no_op_and_another_checkpoint_is_kept(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["--checkpoint", str(tiny), "--mode", "int8", "--out", str(out)]
    cli(quantize_cli.main, argv)
    cli(quantize_cli.main, argv)
    assert "already holds" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli(quantize_cli.main, ["--checkpoint", str(tiny), "--mode", "int4", "--out", str(out)])
    assert e.value.code == 1 and "--force" in capsys.readouterr().err


BAD = {
    "unknown mode": (["--mode", "int3"], "--mode must be int8 or int4"),
    "group size not a power of two": (["--mode", "int4", "--group-size", "48"], "--group-size must be a power of two"),
    "group size for int8": (["--mode", "int8", "--group-size", "64"], "--group-size is for int4"),
    "missing checkpoint": (["--mode", "int8", "--checkpoint", "no/such/dir"], "checkpoint not found"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line(case, tiny, capsys):
    argv, message = BAD[case]
    argv = (["--checkpoint", str(tiny)] if "--checkpoint" not in argv else []) + argv
    with pytest.raises(SystemExit) as e:
        cli(quantize_cli.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_an_already_quantized_checkpoint_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    cli(quantize_cli.main, ["--checkpoint", str(tiny), "--mode", "int8", "--out", str(out)])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli(quantize_cli.main, ["--checkpoint", str(out), "--mode", "int4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already quantized" in err[0]
    assert json.loads(checkpoint.read_metadata(out)["quantization"])["mode"] == "int8"


@pytest.mark.parametrize("mode, group", [("int8", None), ("int4", 64)])
def test_a_quantized_bundled_model_generates_with_its_sources_thresholds(smollm2_dir, tmp_path, capsys, mode, group):
    """generate.py takes the derived checkpoint with no other flag: the shipped thresholds (made for
    the float model) apply, and the measured sparsity is near the target."""
    import generate

    out = tmp_path / "q"
    cli(quantize_cli.main, ["--checkpoint", str(smollm2_dir), "--mode", mode, "--out", str(out)] + (["--group-size", str(group)] if group else []))
    capsys.readouterr()
    cli(generate.main, ["--checkpoint", str(out), "--sparsity", "0.5", "--temperature", "0", "--max-new-tokens", "24",
                        "--chat", "--prompt", "What are the three primary colours?", "--device", "cpu"])
    text, err = capsys.readouterr()
    measured = float(err.split("measured sparsity ")[1].split()[0])
    assert "thresholds for sparsity 0.5 (greedy)" in err and abs(measured - 0.5) < 0.05, err
    assert len(text.split()) > 5


def test_an_int8_head_is_written_loaded_and_tied_heads_copied(tiny, tmp_path):
    """--lm-head: output.weight int8 and output.scales in the file, an Int8Head in the model whose
    logits stay near the float model's; a tied head becomes a quantized copy of the embedding."""
    from model import Int8Head, ModelArgs, Transformer

    out = tmp_path / "q"
    cli(quantize_cli.main, ["--checkpoint", str(tiny), "--mode", "int4", "--group-size", "32", "--lm-head", "--out", str(out)])
    meta = checkpoint.read_metadata(out)
    assert checkpoint.quantization_of(meta) == {"mode": "int4", "group_size": 32, "lm_head": "int8"} and out.name == "q"
    tensors, _ = checkpoint.read_tensors(out / checkpoint.FILE)
    assert tensors["output.weight"].dtype == torch.int8 and tensors["output.scales"].shape == (256,)
    model, _ = checkpoint.load(out)
    float_model, _ = checkpoint.load(tiny)
    assert isinstance(model.output, Int8Head)
    assert all(torch.equal(model.canonical_weights()[k], t) for k, t in tensors.items())
    h = torch.randn(2, 3, model.config.dim)
    ref = float_model.output(h)
    assert (model.output(h) - ref).norm() / ref.norm() < 0.01

    tied = Transformer(ModelArgs.from_name("tiny-tied"))
    torch.nn.init.normal_(tied.tok_embeddings.weight)
    canonical = {k: v for k, v in tied.canonical_weights().items()}
    assert "output.weight" not in canonical
    quantized = quantize_cli.quantize_tensors(canonical, "int8", head=True)
    W = tied.tok_embeddings.weight.detach()
    assert ((quantized["output.weight"].float() * quantized["output.scales"][:, None] - W).abs()
            <= quantized["output.scales"][:, None] / 2 + 1e-6).all()


def test_an_int8_head_decodes_through_the_kernel_as_its_dense_product(tmp_path):
    """One token goes through the sparse kernel with every input kept (Triton interpreter), more
    tokens through the dense product: both equal the float64 product of the dequantized weight
    within bf16 rounding."""
    from model import Int8Head
    from sparse_kernels.ops import triton_interpret

    head = Int8Head(96, 333, torch.bfloat16)
    W = torch.randn(333, 96)
    head.weight.load(quantize(W, "int8"))
    x = torch.randn(1, 1, 96, dtype=torch.bfloat16) * 3
    ref = x.double().reshape(1, 96) @ head.weight.dequantize().double().t()
    dense = head(torch.cat([x, x], dim=1))[:, :1]  # two tokens: the dense product
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        assert triton_interpret()
        kernel = head(x)
    for y in (kernel, dense):
        assert y.shape == (1, 1, 333) and ((y.double().reshape(1, 333) - ref).abs() <= 0.02 * ref.abs().max()).all()
