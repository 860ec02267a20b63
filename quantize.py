"""Quantize a checkpoint's projections to int8 or int4 weights: a derived checkpoint.

    python quantize.py --checkpoint DIR --mode int8                  # -> DIR-int8
    python quantize.py --checkpoint DIR --mode int4 --group-size 128 # -> DIR-int4-g128
    python quantize.py --mode int8                                   # the bundled model
    python quantize.py --checkpoint DIR --mode int8 --lm-head        # lm_head in int8 too

Every projection (q, k, v, o, gate, up, down) is quantized by round-to-nearest
(sparse_kernels.quantize: int8 one scale per output channel; int4 a scale and a zero per group of
input channels); with --lm-head, lm_head too, in int8 (never sparse, it is the largest single read
of a decode step: an eighth of a Llama-3-8B step's bytes at 50% sparsity). Embeddings and norms
stay as they are. The output directory holds the
tokenizer, the source's thresholds file if it has one, and model.safetensors written last and
atomically; its metadata records the source's fingerprint, so the source's thresholds apply
unchanged (sparsity is measured on the activations, which quantization barely moves).
"""
import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import checkpoint
from generate import UsageError, cli, resolve_device
from sparse_kernels import GROUP_SIZES, PackedWeight, quantize

MODES = ("int8", "int4")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.tiktoken", "tokenizer.model")


def is_projection(name):
    """Whether a canonical tensor is a projection segment's weight (layers.{i}.attention.q.weight ...)."""
    return name.startswith("layers.") and name.rsplit(".", 2)[-2] in ("q", "k", "v", "o", "gate", "up", "down")


def quantize_tensors(tensors, mode, group_size=None, device="cpu", head=False):
    """Canonical float tensors -> the same with every projection's weight quantized (its name.weight
    replaced by the format's canonical tensors, name.scales and name.zeros beside it); with head,
    lm_head in int8 as output.weight and output.scales (a tied head: a quantized copy of the embedding)."""
    out = {}
    if head:
        W = tensors.get("output.weight", tensors["tok_embeddings.weight"])
        out.update((f"output.{part}", t.cpu()) for part, t in quantize(W.to(device), "int8").items())
        tensors = {k: v for k, v in tensors.items() if k != "output.weight"}
    names = sorted(tensors)
    for name in tqdm(names, desc=f"quantize {mode}", unit="tensor", file=sys.stderr):
        if not is_projection(name):
            out[name] = tensors[name]
            continue
        prefix = name.removesuffix(".weight")
        for part, t in quantize(tensors[name].to(device), mode, group_size).items():
            out[f"{prefix}.{part}"] = t.cpu()
    return out


@torch.no_grad()
def quantize_model(model, mode, group_size=None):
    """Quantize a model's projections in place (a model built on the GPU with random weights, as
    the decode benchmark builds them): each fused weight at once, its rows being independent.
    lm_head stays as it is."""
    for proj in model.projections():
        pw = proj.weight
        quantized = PackedWeight(pw.out_features, pw.in_features, mode, pw.splits, device=pw.data.device, dtype=pw.dtype,
                                 group_size=group_size)
        proj.weight = quantized.load(quantize(pw.dequantize(), mode, group_size))
    return model


# The dense quantized baselines the benchmarks measure the sparse kernels against: gpt-fast's
# weight-only int8 linear (inductor fuses the cast into its GEMV) and torch's tinygemm int4 kernel.
# Each holds the same quantized weight as a PackedWeight and computes x @ W.T with no sparsity.

class Int8Linear(nn.Module):
    """gpt-fast's WeightOnlyInt8Linear: W int8 [out, in], one scale an output channel."""

    def __init__(self, pw):
        super().__init__()
        self.register_buffer("weight", pw.data.t().contiguous())  # [out, in]
        self.register_buffer("scales", pw.scales.to(pw.dtype))

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype)) * self.scales


class Int4Linear(nn.Module):
    """torch's tinygemm (torch.ops.aten._weight_int4pack_mm, as gpt-fast and torchao use it), from
    an int4 PackedWeight: tinygemm dequantizes (q - 8) * scale + zero, so zero = (8 - ours) * scale."""

    def __init__(self, pw, inner_k_tiles=8):
        super().__init__()
        self.out_features, self.group_size = pw.out_features, pw.group_size
        q = pw.int4_values().t().contiguous().to(torch.int32)  # [out, in]
        self.register_buffer("weight", torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), inner_k_tiles))
        scales = pw.scales.float()  # [n_groups, out]
        zeros = (8 - pw.zeros.float()) * scales
        self.register_buffer("scales_and_zeros", torch.stack([scales, zeros], dim=-1).to(torch.bfloat16).contiguous())

    def forward(self, x):
        y = torch._weight_int4pack_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), self.weight, self.group_size, self.scales_and_zeros)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def dense_baseline(model):
    """A quantized model's dense baseline, in place: each projection's PackedWeight replaced by
    gpt-fast's int8 linear or tinygemm's int4 one, an int8 head by gpt-fast's int8 linear (as
    gpt-fast quantizes its head), for decoding with sparse=False only."""
    for proj in model.projections():
        proj.weight = {"int8": Int8Linear, "int4": Int4Linear}[proj.weight.fmt](proj.weight)
    if model.packed_head() is not None:
        model.output = Int8Linear(model.packed_head())
    return model


def suffix(mode, group_size, head=False):
    """What a derived checkpoint's directory and name add to its source's: -int8, -int4-g128, and
    -head8 for an int8 lm_head."""
    return f"-{mode}" + (f"-g{group_size}" if mode == "int4" else "") + ("-head8" if head else "")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="checkpoint dir or model.safetensors (default: the bundled model)")
    p.add_argument("--mode", required=True, help="int8 (per output channel) or int4 (per group of input channels)")
    p.add_argument("--group-size", type=int, help=f"int4: input channels a group, one of {', '.join(map(str, GROUP_SIZES))} (default: 128)")
    p.add_argument("--lm-head", action="store_true", help="quantize lm_head too, to int8 (default: it stays float)")
    p.add_argument("--out", type=Path, help="output directory (default: beside the source, named DIR-int8 or DIR-int4-g<G>, "
                                             "-head8 added with --lm-head)")
    p.add_argument("--device", default="cpu", help="where to compute the quantization (cpu, cuda)")
    p.add_argument("--force", action="store_true", help="quantize again even if --out already holds the result")
    args = p.parse_args(argv)
    if args.mode not in MODES:
        raise UsageError(f"--mode must be int8 or int4, got {args.mode!r}")
    if args.mode == "int8" and args.group_size is not None:
        raise UsageError("--group-size is for int4; int8 has one scale per output channel")
    if args.mode == "int4":
        args.group_size = args.group_size or 128
        if args.group_size not in GROUP_SIZES:
            raise UsageError(f"--group-size must be a power of two in {', '.join(map(str, GROUP_SIZES))}, got {args.group_size}")
    return args


def main(argv=None):
    args = parse_args(argv)
    resolve_device(args.device)
    source = checkpoint.resolve(args.checkpoint)
    meta = checkpoint.read_metadata(source)
    if checkpoint.quantization_of(meta):
        raise UsageError(f"{source} is already quantized ({meta['quantization']}); quantize its float source instead")
    quantization = {"mode": args.mode, "group_size": args.group_size, **({"lm_head": "int8"} if args.lm_head else {})}
    name = suffix(args.mode, args.group_size, args.lm_head)
    out_dir = args.out or source.parent.with_name(source.parent.name + name)
    target = out_dir / checkpoint.FILE
    if target.is_file() and not args.force:
        done = checkpoint.read_metadata(target)
        if (done.get("source_fingerprint"), checkpoint.quantization_of(done)) == (meta["fingerprint"], quantization):
            print(f"{out_dir} already holds {source.parent.name} quantized so (--force quantizes again)")
            return
        raise UsageError(f"{out_dir} already holds another checkpoint; pass --force to replace it, or choose another --out")

    t0 = time.perf_counter()
    tensors, _ = checkpoint.read_tensors(source)
    quantized = quantize_tensors(tensors, args.mode, args.group_size, args.device, head=args.lm_head)
    out_dir.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)  # the directory reads as incomplete until the new weights land
    for file in TOKENIZER_FILES + ("thresholds.json",):
        if (source.parent / file).is_file():
            shutil.copyfile(source.parent / file, out_dir / file)
    saved = checkpoint.save(target, quantized, checkpoint.config_of(meta), meta["name"] + name,
                            quantization=quantization, source=meta["name"], source_format="teal-checkpoint",
                            source_fingerprint=meta["fingerprint"])
    before, after = (sum(t.numel() * t.element_size() for t in d.values()) for d in (tensors, quantized))
    print(f"wrote {out_dir} ({saved['name']}: {before / 1e9:.2f} GB -> {after / 1e9:.2f} GB, fingerprint {saved['fingerprint']}) "
          f"in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    cli(main, errors=(OSError,))
