"""model.py against transformers' Llama and Mistral on the same random weights, and the KV cache
against a cache-free forward."""
import pytest
import torch

from model import ModelArgs, Transformer

transformers = pytest.importorskip("transformers", reason="transformers is the reference model")

MISTRAL_LIKE = ModelArgs(dim=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=112, vocab_size=320, block_size=128,
                         rope_base=1e6, norm_eps=1e-6)


def hf_model(args, mistral=False):
    """transformers' model for args, with random weights large enough that a wrong RoPE or mapping shows."""
    kw = dict(hidden_size=args.dim, num_hidden_layers=args.n_layer, num_attention_heads=args.n_head,
              num_key_value_heads=args.n_kv_head, head_dim=args.head_dim, intermediate_size=args.intermediate_size,
              vocab_size=args.vocab_size, max_position_embeddings=args.block_size, rms_norm_eps=args.norm_eps,
              rope_theta=args.rope_base, tie_word_embeddings=args.tie_embeddings,
              rope_scaling=dict(rope_type="llama3", **args.rope_scaling) if args.rope_scaling else None)
    if mistral:  # a window longer than any test sequence: sliding-window attention is then full attention
        config = transformers.MistralConfig(sliding_window=args.block_size, **kw)
        model = transformers.MistralForCausalLM(config)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model.eval()


def from_hf(hf, args):
    """model.py's Transformer holding hf's weights (Hugging Face's q/k layout is model.py's)."""
    model = Transformer(args)
    with torch.no_grad():
        model.tok_embeddings.weight.copy_(hf.model.embed_tokens.weight)
        model.norm.weight.copy_(hf.model.norm.weight)
        if not args.tie_embeddings:
            model.output.weight.copy_(hf.lm_head.weight)
        for ours, theirs in zip(model.layers, hf.model.layers):
            a, m = theirs.self_attn, theirs.mlp
            ours.attention_norm.weight.copy_(theirs.input_layernorm.weight)
            ours.ffn_norm.weight.copy_(theirs.post_attention_layernorm.weight)
            ours.attention.qkv.weight.data.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).t())
            ours.attention.o.weight.data.copy_(a.o_proj.weight.t())
            ours.feed_forward.gate_up.weight.data.copy_(torch.cat([m.gate_proj.weight, m.up_proj.weight]).t())
            ours.feed_forward.down.weight.data.copy_(m.down_proj.weight.t())
    return model.eval()


CASES = {
    "gqa": (ModelArgs.from_name("tiny"), False),
    "tied": (ModelArgs.from_name("tiny-tied"), False),
    "llama3.1-rope": (ModelArgs.from_name("tiny-llama31"), False),
    "mistral": (MISTRAL_LIKE, True),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case):
    args, mistral = CASES[case]
    hf = hf_model(args, mistral)
    model = from_hf(hf, args)
    # 100 positions: past tiny-llama31's original 64, where its RoPE scaling matters most
    idx = torch.randint(0, args.vocab_size, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert theirs.abs().max() > 1  # the comparison is not between two near-zero tensors
    diff = float((ours - theirs).abs().max())
    assert diff < 1e-4


@pytest.mark.parametrize("name", ["tiny", "tiny-tied", "tiny-llama31"])
def test_cached_decode_equals_full_forward(name):
    args = ModelArgs.from_name(name)
    torch.manual_seed(0)
    model = Transformer(args).eval()
    for p in model.projections():  # packed weights are allocated, not initialised
        torch.nn.init.normal_(p.weight.data, std=p.weight.in_features ** -0.5)
    idx = torch.randint(0, args.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)
        model.setup_caches(1, 64)
        steps = [model(idx[:, :30], torch.arange(30))]  # prefill, then one token at a time
        steps += [model(idx[:, t:t + 1], torch.tensor([t])) for t in range(30, 40)]
    diff = float((torch.cat(steps, dim=1) - full).abs().max())
    assert diff < 1e-4
