"""checkpoint.py: canonical weights on disk, packed at load; versions; derived checkpoints and the
thresholds they accept; the model knowing no files."""
import ast
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import checkpoint
import thresholds
from checkpoint import CheckpointError
from model import ModelArgs, Transformer
from tests.helpers import REPO, SHIPPED, random_model


def saved(tmp_path, name="tiny", seed=0, **extra):
    model = random_model(name, seed)
    path = tmp_path / f"{name}-{seed}" / checkpoint.FILE
    meta = checkpoint.save(path, model.canonical_weights(), model.config, f"{name}-{seed}", **extra)
    return model, path, meta


def test_canonical_names_and_shapes(tmp_path):
    """The file holds each projection as [out, in] under its own name, not the kernels' layout."""
    model, path, _ = saved(tmp_path)
    tensors, _ = checkpoint.read_tensors(path)
    c = model.config
    assert tensors["layers.0.attention.q.weight"].shape == (c.n_head * c.head_dim, c.dim)
    assert tensors["layers.1.attention.k.weight"].shape == (c.n_kv_head * c.head_dim, c.dim)
    assert tensors["layers.0.attention.o.weight"].shape == (c.dim, c.n_head * c.head_dim)
    assert tensors["layers.0.feed_forward.down.weight"].shape == (c.dim, c.intermediate_size)
    assert not any("qkv" in k or "gate_up" in k or k.endswith(".data") for k in tensors)
    W = model.layers[0].attention.qkv.weight.dequantize()  # [out, in] = [q | k | v] rows
    assert torch.equal(tensors["layers.0.attention.v.weight"], W[-c.n_kv_head * c.head_dim:])


def test_load_equals_the_saved_model_and_its_fingerprint(tmp_path):
    model, path, meta = saved(tmp_path)
    loaded, meta2 = checkpoint.load(path)
    idx = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    assert meta2["fingerprint"] == meta["fingerprint"] == checkpoint.fingerprint(loaded.canonical_weights())
    assert meta["fingerprint"] != saved(tmp_path, seed=1)[2]["fingerprint"]


def test_load_in_another_dtype_packs_in_that_dtype(tmp_path):
    _, path, _ = saved(tmp_path)
    model, _ = checkpoint.load(path, dtype=torch.bfloat16)
    assert all(p.weight.fmt == "bf16" for p in model.projections())


def test_old_version_is_refused_with_the_reconvert_line(tmp_path):
    model = random_model()
    path = tmp_path / checkpoint.FILE
    meta = {"format": checkpoint.FORMAT, "version": "1", "name": "old", "config": "{}", "fingerprint": "0" * 16}
    save_file({"tok_embeddings.weight": model.tok_embeddings.weight.detach().contiguous()}, path, metadata=meta)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path)
    assert "version 1" in str(e.value) and "--force" in str(e.value) and "\n" not in str(e.value)


def test_newer_version_is_refused(tmp_path):
    _, path, meta = saved(tmp_path)
    tensors, _ = checkpoint.read_tensors(path)
    save_file(tensors, path, metadata=dict(meta, version=str(checkpoint.VERSION + 1)))
    with pytest.raises(CheckpointError, match="update the code"):
        checkpoint.read_metadata(path)


def test_save_refuses_tensors_that_do_not_fit(tmp_path):
    model = random_model()
    tensors = model.canonical_weights()
    for broken, message in [({k: v for k, v in tensors.items() if k != "layers.1.attention.k.weight"}, "missing"),
                            (dict(tensors, extra=torch.zeros(1)), "unexpected"),
                            (dict(tensors, **{"layers.0.feed_forward.up.weight": torch.zeros(3, 3)}), "wrong shape")]:
        with pytest.raises(CheckpointError, match=message):
            checkpoint.save(tmp_path / checkpoint.FILE, broken, model.config, "broken")
    assert not (tmp_path / checkpoint.FILE).exists()


def table_for(meta, config):
    t = thresholds.Thresholds(grid=[0.0, 0.5], uniform=torch.zeros(config.n_layer, 7, 2) + torch.tensor([0.0, 0.1]),
                              config=thresholds.store.config_dict(config), name=meta["name"], fingerprint=meta["fingerprint"])
    return t


def test_derived_checkpoint_accepts_its_sources_thresholds_and_refuses_others(tmp_path):
    source, _, source_meta = saved(tmp_path, seed=0)
    other, _, other_meta = saved(tmp_path, seed=1)
    table_for(source_meta, source.config).save(tmp_path / "source.json")
    table_for(other_meta, other.config).save(tmp_path / "other.json")
    # Derived: other weights (as quantized or resharded ones would be), its source recorded.
    derived = random_model(seed=2)
    path = tmp_path / "derived" / checkpoint.FILE
    meta = checkpoint.save(path, derived.canonical_weights(), derived.config, "derived", source_fingerprint=source_meta["fingerprint"])
    assert checkpoint.lineage(meta) == (meta["fingerprint"], source_meta["fingerprint"])
    thresholds.load(tmp_path / "source.json", fingerprint=checkpoint.lineage(meta), config=derived.config)
    with pytest.raises(thresholds.ThresholdsError, match="not this checkpoint"):
        thresholds.load(tmp_path / "other.json", fingerprint=checkpoint.lineage(meta))
    with pytest.raises(thresholds.ThresholdsError, match="not this checkpoint"):
        thresholds.load(tmp_path / "source.json", fingerprint=checkpoint.lineage(other_meta))


def test_model_knows_no_files():
    """model.py imports nothing of safetensors (or of checkpoint.py) and names no script."""
    source = (REPO / "model.py").read_text()
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    assert not imported & {"safetensors", "checkpoint", "json", "os", "pathlib"}, imported
    assert "scripts/" not in source and ".safetensors" not in source


def test_shipped_thresholds_load_for_the_bundled_model(smollm2_dir):
    meta = checkpoint.read_metadata(smollm2_dir)
    path = thresholds.find_thresholds(smollm2_dir, checkpoint.lineage(meta))
    assert path == SHIPPED
    table = thresholds.load(path, fingerprint=checkpoint.lineage(meta), config=checkpoint.config_of(meta))
    assert table.greedy is not None


def test_bundled_model_is_converted_again_when_its_cache_is_old(tmp_path, bundled_gguf):
    """An old-version conversion in the cache is replaced by a fresh one, with no flag."""
    pytest.importorskip("gguf")
    cache = tmp_path / "cache" / checkpoint.BUNDLED
    cache.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, cache / checkpoint.FILE, metadata={"format": checkpoint.FORMAT, "version": "1"})
    done = subprocess.run([sys.executable, "-c", "import checkpoint; print(checkpoint.resolve())"], cwd=REPO,
                          capture_output=True, text=True, env=dict(os.environ, TEAL_CACHE=str(tmp_path / "cache")))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(cache / checkpoint.FILE)
    meta = checkpoint.read_metadata(cache)
    assert meta["version"] == str(checkpoint.VERSION) and json.loads(meta["config"]) == json.loads(
        json.dumps(ModelArgs.from_name("smollm2-135m").__dict__))


def test_weights_load_onto_a_model_built_anywhere(tmp_path):
    """load_weights takes canonical tensors of any float dtype: fp32 on disk, bf16 in the model."""
    model = random_model()
    tensors = {k: v.double() for k, v in model.canonical_weights().items()}
    other = Transformer(model.config, dtype=torch.bfloat16).load_weights(tensors)
    W = other.layers[1].feed_forward.gate_up.weight
    assert W.data.dtype == torch.bfloat16
    assert torch.equal(W.dequantize(), model.layers[1].feed_forward.gate_up.weight.dequantize().bfloat16())
    with pytest.raises(ValueError, match="missing"):
        other.load_weights({})
