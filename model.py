"""A Llama-family transformer with TEAL activation sparsity built in.

Every projection (q, k, v, o, gate, up, down) reads a threshold buffer: at decode, input entries
with |x| <= t (compared in fp32) are zeroed, so the sparse kernel never reads their weight rows.
A threshold of 0 is dense. Prefill (more than one token per sequence) is dense unless asked.
Block.forward holds a block's whole computation; Projection.forward is where sparsity enters.
The model knows no files: checkpoint.py reads them and hands it canonical tensors (load_weights).
"""
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import _functional_collectives as funcol

from sparse_kernels import (PackedWeight, decode_attention, decode_layers, prepare_decode_layers, projection_input, rms_norm,
                            runs_triton, sparse_linear, warm_up, warm_up_attention)
from sparse_kernels.ops import dense_linear

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 32
    intermediate_size: int = 11008
    vocab_size: int = 32000
    block_size: int = 4096  # longest sequence the RoPE table and the cache may hold
    head_dim: int = 0  # 0: dim // n_head
    rope_base: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # Llama-3.1: factor, low/high_freq_factor, original_max_position_embeddings
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")

    @classmethod
    def from_name(cls, name):
        if name not in transformer_configs:
            raise ValueError(f"unknown model config {name!r}; known: {', '.join(transformer_configs)}")
        return cls(**transformer_configs[name])


LLAMA31_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

transformer_configs = {
    "llama-2-7b": dict(dim=4096, n_layer=32, n_head=32, n_kv_head=32, intermediate_size=11008, vocab_size=32000, block_size=4096),
    "llama-2-13b": dict(dim=5120, n_layer=40, n_head=40, n_kv_head=40, intermediate_size=13824, vocab_size=32000, block_size=4096),
    "llama-2-70b": dict(dim=8192, n_layer=80, n_head=64, n_kv_head=8, intermediate_size=28672, vocab_size=32000, block_size=4096),
    "llama-3-8b": dict(dim=4096, n_layer=32, n_head=32, n_kv_head=8, intermediate_size=14336, vocab_size=128256, block_size=8192, rope_base=500000.0),
    "llama-3-70b": dict(dim=8192, n_layer=80, n_head=64, n_kv_head=8, intermediate_size=28672, vocab_size=128256, block_size=8192, rope_base=500000.0),
    "llama-3.1-8b": dict(dim=4096, n_layer=32, n_head=32, n_kv_head=8, intermediate_size=14336, vocab_size=128256, block_size=131072, rope_base=500000.0, rope_scaling=LLAMA31_ROPE),
    "llama-3.1-70b": dict(dim=8192, n_layer=80, n_head=64, n_kv_head=8, intermediate_size=28672, vocab_size=128256, block_size=131072, rope_base=500000.0, rope_scaling=LLAMA31_ROPE),
    # Mistral-7B-v0.1 uses a 4096-token sliding window; capping the sequence at 4096 makes full attention exact.
    "mistral-7b": dict(dim=4096, n_layer=32, n_head=32, n_kv_head=8, intermediate_size=14336, vocab_size=32000, block_size=4096),
    "smollm2-135m": dict(dim=576, n_layer=30, n_head=9, n_kv_head=3, intermediate_size=1536, vocab_size=49152, block_size=8192, rope_base=100000.0, tie_embeddings=True),
    "tiny": dict(dim=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=96, vocab_size=256, block_size=128),
    "tiny-tied": dict(dim=48, n_layer=2, n_head=3, n_kv_head=1, intermediate_size=80, vocab_size=300, block_size=128, rope_base=100000.0, tie_embeddings=True),
    "tiny-llama31": dict(dim=64, n_layer=2, n_head=4, n_kv_head=1, intermediate_size=128, vocab_size=256, block_size=256, rope_base=500000.0, rope_scaling=dict(LLAMA31_ROPE, original_max_position_embeddings=64)),
}


class KVCache(nn.Module):
    def __init__(self, batch_size, max_seq_length, n_kv_head, head_dim, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq_length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        # input_pos: (T,), k, v: (B, n_kv_head, T, head_dim)
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        return self.k, self.v


class Projection(nn.Module):
    """A linear layer whose input is thresholded when `sparse`: one threshold per output segment.

    q, k and v share one input but each has its own threshold, so they are one weight with three
    segments (gate and up likewise with two): one kernel launch reads the union of active rows.
    `names` are the segments' names, as canonical checkpoint tensors name them.
    """

    def __init__(self, in_features, splits, names, weights, device=None):
        """weights: (format, activation dtype, group size), as PackedWeight takes them."""
        super().__init__()
        self.names = names
        fmt, dtype, group_size = weights
        self.weight = PackedWeight(sum(splits), in_features, fmt, splits, device=device, dtype=dtype, group_size=group_size)
        # Not in the state dict: thresholds come from a thresholds file, tied to the checkpoint.
        self.register_buffer("thresholds", torch.zeros(len(splits), device=device), persistent=False)
        # Inputs each threshold kept, counted by the kernel while record is on (record_sparsity).
        self.record = False
        self.register_buffer("kept", torch.zeros(len(splits), dtype=torch.int64, device=device), persistent=False)
        # observer(projection, input proper): how calibration sees the input (eager only).
        self.observer = None
        # A row-parallel shard's process group (tp.py): this rank holds some input rows of W, so its
        # product is a partial sum, added over the group before the residual.
        self.group = None

    def forward(self, x, sparse, norm=None, swiglu=False, residual=None):
        """[residual +] W @ input, the input being norm(x) with a norm (an RMSNorm), silu(gate) * up
        of x = [gate | up] with swiglu, else x itself. Sparse, each segment s zeroes the input's
        entries with |input| <= t_s first: y_s = (input * (|input| > t_s)) @ W_s.T, and one kernel
        launch makes the input, multiplies and adds (sparse_kernels.sparse_linear)."""
        norm_weight, eps = (norm.weight, norm.eps) if norm is not None else (None, 0.0)
        if self.observer is not None:
            self.observer(self, projection_input(x, norm_weight, eps, swiglu))
        fused_residual = residual if self.group is None else None
        if not sparse:
            y = self.weight(projection_input(x, norm_weight, eps, swiglu))
            y = y if fused_residual is None else fused_residual + y
        else:
            y = sparse_linear(x, self.weight, self.thresholds, norm_weight=norm_weight, norm_eps=eps, swiglu=swiglu,
                              residual=fused_residual, kept=self.kept if self.record else None)
        if self.group is None:
            return y
        # A functional collective, so that the compiled step's CUDA graph captures it; the residual
        # is added once, to the sum, as one process adds it.
        y = funcol.all_reduce(y, "sum", self.group)
        return y if residual is None else residual + y

    def counts(self):
        """-> (inputs each threshold kept [n_segments], input entries a token brings): a row-parallel
        shard's summed over its group, so the figures are the whole projection's."""
        if self.group is None:
            return self.kept, self.weight.in_features
        return funcol.all_reduce(self.kept, "sum", self.group), self.weight.in_features * dist.get_world_size(self.group)


class Int8Head(nn.Module):
    """lm_head with int8 weights (quantize.py --lm-head): a quarter of a bf16 head's bytes, the
    step's largest single read. Never sparse: one token goes through the sparse kernel with every
    input kept (the threshold is -inf), more tokens through the weight's dense product."""

    def __init__(self, dim, vocab_size, dtype, device=None):
        super().__init__()
        self.weight = PackedWeight(vocab_size, dim, "int8", device=device, dtype=dtype)
        self.register_buffer("keep_all", torch.full((1,), -math.inf, device=device), persistent=False)

    def forward(self, x):
        if x.shape[-2] == 1 and runs_triton(x.device):
            return sparse_linear(x, self.weight, self.keep_all)
        return self.weight(x)


@contextmanager
def observing(observers):
    """observers: {projection: fn(projection, input proper)}, set on the projections for the block."""
    for proj, fn in observers.items():
        proj.observer = fn
    try:
        yield
    finally:
        for proj in observers:
            proj.observer = None


class Attention(nn.Module):
    def __init__(self, config, weights, device=None):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        q_out, kv_out = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        self.splits = (q_out, kv_out, kv_out)
        self.qkv = Projection(config.dim, self.splits, ("q", "k", "v"), weights, device)
        self.o = Projection(q_out, (config.dim,), ("o",), weights, device)
        self.kv_cache = None

    def forward(self, qkv, rope, input_pos, mask):
        """softmax(rope(q) rope(k)^T / sqrt(head_dim)) v over the cache (or the sequence, causally,
        with no input_pos). qkv: (B, T, [q | k | v]); rope: the (cos, sin) tables, (block_size,
        head_dim) each. -> (B, T, n_head * head_dim)."""
        B, T, _ = qkv.shape
        if input_pos is not None and T == 1 and runs_triton(qkv.device):
            # Decode: rope, the cache write and attention, as one kernel.
            y = decode_attention(qkv.view(B, -1), self.kv_cache.k, self.kv_cache.v, *rope, input_pos,
                                 self.n_head, self.n_kv_head)
            return y.view(B, 1, -1)
        positions = torch.arange(T, device=qkv.device) if input_pos is None else input_pos
        rope = (rope[0][positions], rope[1][positions])  # (T, head_dim) each
        q, k, v = qkv.split(self.splits, dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if input_pos is None:  # a cache-free causal pass over the sequence
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            k, v = self.kv_cache.update(input_pos, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)


class FeedForward(nn.Module):
    """down(silu(gate(x)) * up(x)): gate and up are one projection of two segments."""

    def __init__(self, config, weights, device=None):
        super().__init__()
        self.gate_up = Projection(config.dim, (config.intermediate_size, config.intermediate_size), ("gate", "up"), weights, device)
        self.down = Projection(config.intermediate_size, (config.dim,), ("down",), weights, device)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class Block(nn.Module):
    def __init__(self, config, weights, dtype, device=None):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps, dtype, device)
        self.attention = Attention(config, weights, device)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps, dtype, device)
        self.feed_forward = FeedForward(config, weights, device)

    def projections(self):
        """The block's Projection modules and which of the seven thresholds each holds."""
        return [(self.attention.qkv, slice(0, 3)), (self.attention.o, slice(3, 4)),
                (self.feed_forward.gate_up, slice(4, 6)), (self.feed_forward.down, slice(6, 7))]

    def forward(self, x, rope, input_pos, mask, sparse):
        """h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h)).

        Each norm, SwiGLU and residual add is handed to the projection that consumes it, so that
        in a sparse decode step it runs inside that projection's kernel launch."""
        attn, ffn = self.attention, self.feed_forward
        qkv = attn.qkv(x, sparse, norm=self.attention_norm)  # qkv(attention_norm(x))
        h = attn.o(attn(qkv, rope, input_pos, mask), sparse, residual=x)  # x + o(attention)
        gate_up = ffn.gate_up(h, sparse, norm=self.ffn_norm)  # [gate | up](ffn_norm(h))
        return ffn.down(gate_up, sparse, swiglu=True, residual=h)  # h + down(silu(gate) * up)


class Transformer(nn.Module):
    def __init__(self, config, dtype=torch.float32, fmt=None, group_size=None, head=None, device=None):
        """Built directly in its dtype: thresholds stay fp32, so never call .to(dtype) on it.
        fmt: the projections' weight format (sparse_kernels.FORMATS; by default dtype's float one),
        group_size: int4's; head: "int8" for an int8 lm_head (Int8Head, never tied), else float."""
        super().__init__()
        self.config = config
        fmt = fmt or {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        weights = (fmt, dtype, group_size)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim, dtype=dtype, device=device)
        self.layers = nn.ModuleList(Block(config, weights, dtype, device) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps, dtype, device)
        if head == "int8":
            self.output = Int8Head(config.dim, config.vocab_size, dtype, device)
        else:
            self.output = nn.Linear(config.dim, config.vocab_size, bias=False, dtype=dtype, device=device)
            if config.tie_embeddings:
                self.output.weight = self.tok_embeddings.weight
        self.record = False  # record_sparsity
        self.persistent = False  # use_persistent: every layer of a one-token sparse step in one kernel
        self.register_buffer("recorded_tokens", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        cos, sin = rope_table(config)
        self.register_buffer("rope_cos", cos.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("rope_sin", sin.to(device=device, dtype=dtype), persistent=False)

    def setup_caches(self, batch_size, max_seq_length, persistent=False):
        """KV caches for batch_size sequences of max_seq_length tokens; persistent: use_persistent()."""
        if max_seq_length > self.config.block_size:
            raise ValueError(f"a cache of {max_seq_length} tokens exceeds the model's {self.config.block_size}")
        dtype, device = self.tok_embeddings.weight.dtype, self.tok_embeddings.weight.device
        attn = self.layers[0].attention  # its heads: under tp.py, this rank's share of the config's
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch_size, max_seq_length, attn.n_kv_head, attn.head_dim, dtype, device)
        # The kernels' shared workspace must exist before a CUDA graph is recorded: allocated during
        # torch.compile's warm-up run it would land in the graph's private pool, which refuses it.
        for pw in [proj.weight for proj, _ in self.layers[0].projections()] + [w for w in [self.packed_head()] if w is not None]:
            warm_up(pw, max_rows=batch_size)
        warm_up_attention(batch_size, attn.n_head, max_seq_length, attn.head_dim, device)
        self.persistent = False
        if persistent:
            self.use_persistent()

    def use_persistent(self, enabled=True):
        """Run each sparse one-token decode step's layers as one persistent kernel (sparse_kernels.
        decode_layers) instead of five kernels a layer -> whether it can run here; if not (no Triton
        device, a batch, tensor parallelism, a grid that cannot be resident) it says why and the
        per-projection kernels stay. After setup_caches, before compiling the step: it builds the
        kernel's plan for these caches and weights, which must not move afterwards."""
        self.persistent = False
        if not enabled:
            return False
        cache = self.layers[0].attention.kv_cache
        if cache is None:
            raise RuntimeError("use_persistent needs the KV caches: call setup_caches first")
        args = self.decode_layers_args()
        if cache.k.shape[0] != 1:
            reason = "one sequence only"
        elif any(proj.group is not None for proj in self.projections()):
            reason = "tensor parallelism"
        else:
            x = torch.zeros(1, 1, self.config.dim, dtype=cache.k.dtype, device=cache.k.device)
            reason = prepare_decode_layers(x, torch.zeros(1, dtype=torch.long, device=x.device), *args)
        if reason is not None:
            print(f"the persistent decode step cannot run here ({reason}): one kernel a projection", file=sys.stderr)
            return False
        self.persistent = True
        return True

    def decode_layers_args(self):
        """decode_layers' arguments after x and pos: the rotary tables, each layer's tensors as
        sparse_kernels.persistent's slots name them, the segment widths, heads, eps, group size. Made
        from the modules at each call, so that torch.compile sees each tensor as the parameter or
        buffer it is (CUDA graphs then take them in place)."""
        weights, mutated = [], []
        for layer in self.layers:
            attn, ffn = layer.attention, layer.feed_forward
            projections = (attn.qkv, attn.o, ffn.gate_up, ffn.down)
            parts = []
            for proj in projections:
                data, scales, zeros, _ = proj.weight.kernel_tensors()
                t = proj.thresholds  # stands in for the scales and zeros a format has not: never read
                parts.append([data, t if scales is None else scales, t if zeros is None else zeros, t])
            weights += [layer.attention_norm.weight, *parts[0], *parts[1], layer.ffn_norm.weight, *parts[2], *parts[3]]
            mutated += [attn.kv_cache.k, attn.kv_cache.v, *(proj.kept for proj in projections)]
        first = self.layers[0]
        splits = [w for proj, _ in first.projections() for w in proj.weight.splits]
        return (self.rope_cos, self.rope_sin, weights, mutated, splits, first.attention.n_head, first.attention.n_kv_head,
                self.config.norm_eps, first.attention.qkv.weight.group_size or 0)

    def forward(self, idx, input_pos=None, sparse=None):
        """idx: (B, T) token ids; input_pos: (T,) cache slots, or None for a cache-free causal pass.

        sparse: threshold the projections' inputs; by default only when decoding one token.
        """
        B, T = idx.shape
        sparse = T == 1 if sparse is None else sparse
        if sparse and self.record:
            self.recorded_tokens += B * T
        mask = None
        if input_pos is not None:
            if self.layers[0].attention.kv_cache is None:
                raise RuntimeError("input_pos given but no KV cache: call setup_caches first")
            # Query at position p sees cache slots 0..p; slots beyond are stale or empty.
            cache_len = self.layers[0].attention.kv_cache.k.shape[2]
            mask = input_pos[:, None] >= torch.arange(cache_len, device=idx.device)  # (T, cache_len)
        x = self.tok_embeddings(idx)  # (B, T, dim)
        if self.persistent and sparse and T == 1 and input_pos is not None:
            x = decode_layers(x, input_pos, *self.decode_layers_args(), count=self.record)  # every layer, one launch
        else:
            for layer in self.layers:
                x = layer(x, (self.rope_cos, self.rope_sin), input_pos, mask, sparse)
        x = self.norm(x)
        if sparse and T == 1 and isinstance(self.output, nn.Linear):
            # The sparse step's head: on the CPU its own GEMV (sparse_kernels.ops.dense_linear), which
            # reads the head's bytes 2.5x as fast as MKL's; the dense step keeps torch's throughout.
            return dense_linear(x, self.output.weight)  # (B, 1, vocab_size)
        return self.output(x)  # (B, T, vocab_size)

    def projections(self):
        return [p for layer in self.layers for p, _ in layer.projections()]

    # Canonical tensors: what a checkpoint stores, independent of the kernels' layout. Every
    # parameter under its own name (the tied output is the embedding), and each projection segment
    # as <block path>.<segment name>.<part>, e.g. layers.0.attention.q.weight, [out, in].

    def named_projections(self):
        """(canonical prefix, Projection): a segment's tensors are named prefix.segment.part."""
        return [(name.rpartition(".")[0], m) for name, m in self.named_modules() if isinstance(m, Projection)]

    def packed_head(self):
        """The int8 head's PackedWeight (canonical tensors output.weight, output.scales), or None."""
        return self.output.weight if isinstance(self.output, Int8Head) else None

    def canonical_shapes(self):
        """{canonical name: shape} of every tensor load_weights takes."""
        shapes = {name: tuple(p.shape) for name, p in self.named_parameters()}
        for prefix, proj in self.named_projections():
            for part, shape in proj.weight.canonical_shapes().items():
                for seg, width in zip(proj.names, proj.weight.splits):
                    shapes[f"{prefix}.{seg}.{part}"] = (width, *shape[1:])
        if self.packed_head() is not None:
            shapes.update((f"output.{part}", shape) for part, shape in self.packed_head().canonical_shapes().items())
        return shapes

    @torch.no_grad()
    def load_weights(self, tensors):
        """Copy canonical tensors (any float dtype, any device) into the model, packing each
        projection into its kernels' layout. Every tensor must be there with its shape, and no other."""
        problem = mismatch(self.canonical_shapes(), tensors)
        if problem:
            raise ValueError(f"weights do not fit the config: {problem}")
        for name, p in self.named_parameters():
            p.copy_(tensors[name])
        for prefix, proj in self.named_projections():
            proj.weight.load({part: torch.cat([tensors[f"{prefix}.{seg}.{part}"] for seg in proj.names])
                              for part in proj.weight.canonical_shapes()})
        if self.packed_head() is not None:
            self.packed_head().load({part: tensors[f"output.{part}"] for part in self.packed_head().canonical_shapes()})
        return self

    def canonical_weights(self):
        """{canonical name: tensor}: what load_weights takes, as this model holds it."""
        out = {name: p.detach() for name, p in self.named_parameters()}
        for prefix, proj in self.named_projections():
            for part, t in proj.weight.canonical().items():
                out.update((f"{prefix}.{seg}.{part}", s) for seg, s in zip(proj.names, t.split(list(proj.weight.splits))))
        if self.packed_head() is not None:
            out.update((f"output.{part}", t) for part, t in self.packed_head().canonical().items())
        return out

    def set_thresholds(self, thresholds):
        """thresholds: [n_layer, 7] in PROJECTIONS order; 0 is dense."""
        thresholds = torch.as_tensor(thresholds, dtype=torch.float32)
        if thresholds.shape != (self.config.n_layer, len(PROJECTIONS)):
            raise ValueError(f"thresholds of shape {tuple(thresholds.shape)}, expected ({self.config.n_layer}, {len(PROJECTIONS)})")
        for layer, row in zip(self.layers, thresholds):
            for proj, cols in layer.projections():
                proj.thresholds.copy_(row[cols])

    def get_thresholds(self):
        return torch.stack([torch.cat([p.thresholds.cpu() for p, _ in layer.projections()]) for layer in self.layers])

    def record_sparsity(self, enabled=True):
        """Start (and zero) or stop counting the inputs each projection's threshold keeps in sparse
        passes, and the tokens those passes ran."""
        self.record = enabled
        self.recorded_tokens.zero_()
        for p in self.projections():
            p.record = enabled
            p.kept.zero_()

    def measured_sparsity(self):
        """[n_layer, 7]: fraction of each projection's inputs zeroed since record_sparsity()."""
        tokens = float(self.recorded_tokens)
        rows = [torch.cat([1 - kept.cpu().double() / max(1.0, tokens * n) for kept, n in (p.counts() for p, _ in layer.projections())])
                for layer in self.layers]
        return torch.stack(rows).float()

    def projection_sizes(self):
        """[7]: weights per layer of each projection, to weight sparsities by bytes skipped."""
        c = self.config
        q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
        return torch.tensor([q * c.dim, kv * c.dim, kv * c.dim, c.dim * q, c.intermediate_size * c.dim, c.intermediate_size * c.dim, c.dim * c.intermediate_size], dtype=torch.float64)


def mismatch(shapes, tensors):
    """What keeps tensors from being exactly the named tensors of shapes ({name: shape}), or ""."""
    missing, unexpected = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {shapes[k]})" for k in sorted(set(shapes) & set(tensors))
             if tuple(tensors[k].shape) != shapes[k]]
    return "; ".join(f"{what} {names[:3]}" for what, names in [("missing", missing), ("unexpected", unexpected),
                                                               ("wrong shape", wrong)] if names)


def rope_frequencies(config):
    inv_freq = 1.0 / config.rope_base ** (torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim)
    s = config.rope_scaling
    if not s:
        return inv_freq
    # Llama-3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    ramp = ((old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])).clamp(0, 1)
    return (1 - ramp) * inv_freq / s["factor"] + ramp * inv_freq


def rope_table(config):
    """cos, sin: (block_size, head_dim), for the half-rotation layout (Hugging Face's)."""
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float64), rope_frequencies(config))
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, rope):
    # x: (B, heads, T, head_dim); the first half of head_dim rotates against the second half.
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
