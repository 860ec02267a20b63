"""Convert a Hugging Face Llama-2/3/3.1 or Mistral directory into a checkpoint directory.

    python scripts/convert_hf_checkpoint.py --hf DIR --out DIR [--name NAME] [--dtype auto] [--force]

Reads config.json, the safetensors weights (one file, or shards with their index) and the
tokenizer: tokenizer.model (sentencepiece) is copied; a byte-level BPE tokenizer.json, or Llama-3's
tiktoken file, becomes tokenizer.tiktoken. q and k are copied as they are: Hugging Face already
stores them for the half-rotation RoPE layout model.py uses. The output holds the tokenizer files,
then model.safetensors, written last: a directory with it is complete.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint
import tokenizer as tok
from checkpoint import CheckpointError
from generate import UsageError, cli
from model import ModelArgs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LLAMA3_RANKS = 128000  # Llama-3's tiktoken file holds ids below this; its 256 specials follow


def read_json(path, default=None):
    if not path.is_file():
        if default is None:
            raise UsageError(f"{path} not found")
        return default
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UsageError(f"{path} is not valid JSON ({e})") from None


def hf_config(hf_dir):
    cfg = read_json(hf_dir / "config.json")
    if cfg.get("model_type") not in ("llama", "mistral"):
        raise UsageError(f"{hf_dir}: unsupported architecture {cfg.get('model_type')!r} (llama or mistral)")
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UsageError(f"{hf_dir}: biases or an activation other than SiLU are not supported")
    # transformers 5 writes rope_parameters; earlier versions rope_theta and rope_scaling.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise UsageError(f"{hf_dir}: RoPE scaling {rope_type!r} is not supported (llama3 is)")
    scaling_keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    try:
        block_size = cfg["max_position_embeddings"]
        window = cfg.get("sliding_window")
        if window and window < block_size:
            # Within the window, sliding-window attention is full attention: cap the sequence there.
            print(f"note: sliding window {window} < {block_size} positions; block_size capped at {window}", file=sys.stderr)
            block_size = window
        return ModelArgs(
            dim=cfg["hidden_size"],
            n_layer=cfg["num_hidden_layers"],
            n_head=cfg["num_attention_heads"],
            n_kv_head=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            block_size=block_size,
            head_dim=cfg.get("head_dim") or 0,
            rope_base=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rope_scaling={k: rope[k] for k in scaling_keys} if rope_type == "llama3" else {},
            norm_eps=cfg["rms_norm_eps"],
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise UsageError(f"{hf_dir}/config.json lacks {e.args[0]}") from None


def open_shards(hf_dir):
    """-> {tensor name: open safetensors file holding it}."""
    from safetensors import safe_open

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index)["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UsageError(f"no model.safetensors or model.safetensors.index.json in {hf_dir} (.bin weights are not supported)")
    where = {}
    for file in files:
        try:
            f = safe_open(hf_dir / file, framework="pt")
        except Exception as e:
            raise UsageError(f"{hf_dir / file} is not a readable safetensors file ({e})") from None
        where.update((name, f) for name in f.keys())
    return where


def hf_state_dict(hf_dir, config, dtype):
    """Hugging Face tensors -> canonical tensors (checkpoint.py) in dtype (None: the embedding's dtype)."""
    where = open_shards(hf_dir)
    if "model.embed_tokens.weight" not in where:
        raise UsageError(f"{hf_dir}: no model.embed_tokens.weight among the weights")
    dtype = dtype or where["model.embed_tokens.weight"].get_tensor("model.embed_tokens.weight").dtype
    if dtype not in DTYPES.values():
        raise UsageError(f"{hf_dir}: weights stored in {dtype}; pass --dtype")
    w = {}
    for name, f in tqdm(where.items(), desc="read", unit="tensor"):
        try:
            w[name] = f.get_tensor(name).to(dtype)
        except Exception as e:
            raise UsageError(f"cannot read {name} ({e})") from None

    def take(name):
        if name not in w:
            raise UsageError(f"{hf_dir}: the weights lack {name}")
        return w.pop(name)

    state = {"tok_embeddings.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if config.tie_embeddings:
        w.pop("lm_head.weight", None)
    else:
        state["output.weight"] = take("lm_head.weight")
    for i in range(config.n_layer):
        hf, layer = f"model.layers.{i}.", f"layers.{i}."
        state[layer + "attention_norm.weight"] = take(hf + "input_layernorm.weight")
        state[layer + "ffn_norm.weight"] = take(hf + "post_attention_layernorm.weight")
        for x in "qkvo":
            state[layer + f"attention.{x}.weight"] = take(hf + f"self_attn.{x}_proj.weight")
        for x in ("gate", "up", "down"):
            state[layer + f"feed_forward.{x}.weight"] = take(hf + f"mlp.{x}_proj.weight")
    left = [k for k in w if not k.endswith("rotary_emb.inv_freq")]  # older checkpoints saved the RoPE table
    if left:
        raise UsageError(f"{hf_dir}: weights this model does not use: {left[:3]}")
    return state, dtype


def token_text(token):
    # tokenizer_config.json spells a token as a string or as an AddedToken dict
    return token.get("content") if isinstance(token, dict) else token


def hf_tokenizer(hf_dir):
    """The directory's tokenizer as tokenizer.save_tokenizer's arguments."""
    tc = read_json(hf_dir / "tokenizer_config.json", {})
    template = tc.get("chat_template")
    if isinstance(template, list):  # named templates: the default one is for chat
        template = {t["name"]: t["template"] for t in template}.get("default")
    if (hf_dir / "chat_template.jinja").is_file():
        template = (hf_dir / "chat_template.jinja").read_text()
    model = hf_dir / "tokenizer.model"
    if model.is_file() and is_sentencepiece(model):
        args = sentencepiece_args(model, tc)
    elif (hf_dir / "tokenizer.json").is_file():
        args = tokenizer_json_args(read_json(hf_dir / "tokenizer.json"), tc)
    elif model.is_file() or (hf_dir / "original" / "tokenizer.model").is_file():
        args = llama3_tiktoken_args(model if model.is_file() else hf_dir / "original" / "tokenizer.model", tc)
    else:
        raise UsageError(f"no tokenizer in {hf_dir} (tokenizer.model or tokenizer.json)")
    # generation_config.json lists every id that ends a turn (Llama-3-Instruct: end_of_text, eom, eot).
    gen_eos = read_json(hf_dir / "generation_config.json", {}).get("eos_token_id")
    gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
    args["eos_ids"] = list(dict.fromkeys(i for i in [*args["eos_ids"], *gen_eos] if i is not None))
    return dict(args, chat_template=template)


def is_sentencepiece(path):
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=str(path))
        return True
    except Exception:
        return False


def sentencepiece_args(path, tc):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    special = {sp.id_to_piece(i): i for i in (sp.unk_id(), sp.bos_id(), sp.eos_id()) if i >= 0}
    special.update((token_text(t), int(i)) for i, t in tc.get("added_tokens_decoder", {}).items())
    bos, eos = token_text(tc.get("bos_token")), token_text(tc.get("eos_token"))
    return dict(kind="sentencepiece", special_tokens=special,
                bos_id=special.get(bos, sp.bos_id() if sp.bos_id() >= 0 else None),
                eos_ids=[special.get(eos, sp.eos_id() if sp.eos_id() >= 0 else None)],
                add_bos=bool(tc.get("add_bos_token", True)), sentencepiece_model=path.read_bytes())


def bpe_pattern(pre):
    """tokenizer.json's pre_tokenizer -> the tiktoken regex that splits text the same way."""
    def byte_level(p, use_regex):
        return p.get("type") == "ByteLevel" and not p.get("add_prefix_space") and p.get("use_regex", True) == use_regex

    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if pre and byte_level(pre, True):
        return tok.PATTERNS["gpt2"]
    if len(steps) == 2 and steps[0] == {"type": "Digits", "individual_digits": True} and byte_level(steps[1], True):
        return tok.PATTERNS["smollm"]
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert") and "Regex" in steps[0].get("pattern", {}) and byte_level(steps[1], False)):
        return steps[0]["pattern"]["Regex"]
    raise UsageError(f"unsupported pre-tokenizer in tokenizer.json: {json.dumps(pre)[:200]}")


def tokenizer_json_args(tj, tc):
    model = tj.get("model", {})
    if model.get("type") != "BPE" or tj.get("normalizer") or model.get("byte_fallback") or model.get("continuing_subword_prefix"):
        raise UsageError("tokenizer.json is not a byte-level BPE tokenizer (convert one with tokenizer.model instead)")
    vocab = model["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok.check_merge_order(vocab, merges)
    special = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    bos, eos = token_text(tc.get("bos_token")), token_text(tc.get("eos_token"))
    # Llama-3 adds bos through the post-processor rather than an add_bos_token flag.
    add_bos = tc.get("add_bos_token", bos is not None and json.dumps(bos) in json.dumps(tj.get("post_processor")))
    return dict(kind="tiktoken", pattern=bpe_pattern(tj.get("pre_tokenizer")), special_tokens=special,
                bos_id=special.get(bos), eos_ids=[special.get(eos)], add_bos=bool(add_bos),
                ranks=tok.byte_level_ranks(vocab, skip_ids=set(special.values())))


def llama3_tiktoken_args(path, tc):
    """Meta's Llama-3 tiktoken file: it holds no specials; these are Llama-3.1's 256, as its tokenizer.json names them."""
    ranks = tok.read_tiktoken_ranks(path)
    if len(ranks) != LLAMA3_RANKS:
        raise UsageError(f"{path} has {len(ranks)} tokens, not Llama-3's {LLAMA3_RANKS}")
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", *(f"<|reserved_special_token_{i}|>" for i in range(3, 248))]
    special = {name: LLAMA3_RANKS + i for i, name in enumerate(names)}
    eos = special.get(token_text(tc.get("eos_token")), special["<|end_of_text|>"])
    return dict(kind="tiktoken", pattern=tok.PATTERNS["llama3"], special_tokens=special, bos_id=special["<|begin_of_text|>"],
                eos_ids=[eos, special["<|eot_id|>"]], add_bos=True, ranks=ranks)


def convert(hf_dir, out_dir, name, dtype=None, force=False):
    ckpt = out_dir / "model.safetensors"
    if ckpt.is_file() and not force:
        try:
            source = checkpoint.read_metadata(ckpt).get("source")
        except CheckpointError as e:
            raise UsageError(f"{e}; pass --force to replace it") from None
        if source != hf_dir.name:
            raise UsageError(f"{out_dir} already holds a checkpoint converted from {source}; pass --force to replace it")
        print(f"{out_dir} is already converted from {hf_dir.name} (--force converts again)")
        return
    if not hf_dir.is_dir():
        raise UsageError(f"Hugging Face directory not found: {hf_dir}")
    config = hf_config(hf_dir)
    tokenizer = hf_tokenizer(hf_dir)
    state, dtype = hf_state_dict(hf_dir, config, dtype)
    checkpoint.check_tensors(state, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt.unlink(missing_ok=True)  # with --force: the directory reads as incomplete until the new weights land
    tok.save_tokenizer(out_dir, **tokenizer)
    tok.load_tokenizer(out_dir)
    meta = checkpoint.save(ckpt, state, config, name, source=hf_dir.name, source_format="huggingface")
    print(f"wrote {out_dir} ({name}, {str(dtype).removeprefix('torch.')}, fingerprint {meta['fingerprint']})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", type=Path, required=True, help="Hugging Face model directory")
    parser.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    parser.add_argument("--name", help="checkpoint name (default: the Hugging Face directory's name, lowercased)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="weight dtype (auto: as stored)")
    parser.add_argument("--force", action="store_true", help="convert again even if --out already holds the checkpoint")
    args = parser.parse_args(argv)
    hf_dir = args.hf.resolve()
    convert(hf_dir, args.out, args.name or hf_dir.name.lower(), DTYPES.get(args.dtype), args.force)


if __name__ == "__main__":
    cli(main, errors=(OSError,))
