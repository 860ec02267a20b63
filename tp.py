"""Tensor parallelism: one model over the ranks of torch.distributed, sparse and quantized.

    torchrun --nproc_per_node 2 generate.py --checkpoint DIR --sparsity 0.5

Each block is cut Megatron-style, as gpt-fast's tp.py cuts it, so a decode step needs two
all-reduces a block and nothing else:
- column-parallel: q, k, v by kv-head groups (a rank holds n_kv_head / N kv heads and the q heads
  that read them, so attention is local), gate and up by intermediate columns. Every rank sees the
  whole input, so its threshold test is the one-process test.
- row-parallel: o and down by input rows, the rows their column-parallel producer made on the same
  rank: a rank tests only its shard of the input, with the same thresholds, which is the
  one-process test on those entries. Their partial products are summed by one all-reduce each
  (model.Projection.group), and the residual is added once, to the sum.
- the KV cache holds the rank's kv heads; embeddings, norms and lm_head are whole on every rank.

Shards are cut from the checkpoint's canonical [out, in] tensors and packed per rank at load
(model.load_weights), so every weight format and fused form works on a shard: int8's scales (one
an output channel) are cut with a column-parallel weight's rows and whole with a row-parallel
one's; int4's scales and zeros (one a group of input channels) are cut with a row-parallel
weight's groups, so its shards must fall on group boundaries.
"""
import atexit
import os
import sys
import time
from dataclasses import replace

import torch
import torch.distributed as dist

import checkpoint
from checkpoint import CheckpointError
from model import Transformer

MEMORY_RESERVE = 2 ** 30  # beyond the weights: the KV cache, the kernels' workspace, activations
QUANTIZE = "python quantize.py --checkpoint DIR --mode int8"


class PlacementError(Exception):
    """The model does not fit the launch: a world size its heads do not split into, int4 groups a
    shard would cut, or more memory than the GPU has."""


def quiet():
    """Under torchrun, ranks other than 0 stay quiet: their stdout and stderr go nowhere. Every rank
    runs the same commands on the same input, so rank 0 says everything, errors included, once."""
    if int(os.environ.get("RANK", "0")) > 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")


def init(device):
    """Join torchrun's process group when it started more than one process -> this rank's device
    (cuda:LOCAL_RANK on CUDA), device unchanged outside torchrun. NCCL on CUDA, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return device
    local = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        if local >= torch.cuda.device_count():
            raise PlacementError(f"torchrun started {world} processes but this host has {torch.cuda.device_count()} CUDA GPU(s)")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
        # NVLink multicast (NVLS) stays off: on a shared host its set-up can take other jobs' GPUs down.
        os.environ["NCCL_NVLS_ENABLE"] = "0"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    atexit.register(leave)
    return device


def leave():
    """Close the process group (at exit: NCCL warns of a group left open)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def end(code):
    """End the command with exit code code. A rank of a torchrun launch runs the exit handlers
    (leave among them) and then exits without the interpreter's finalization: once a functional
    collective has used a group, torch keeps it alive past destroy_process_group, so gloo's worker
    threads live on, and one that drops a finished all-reduce's tensors after finalization began
    needs the GIL it can no longer take and aborts the process (SIGABRT, "terminate called without
    an active exception"; seen on loaded 2-core machines). Every file is closed by then."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def shard_config(config, world):
    """The shapes one of world ranks holds: its share of the heads and intermediate columns (head_dim
    and dim whole)."""
    if config.n_kv_head % world or config.intermediate_size % world:
        fits = [n for n in range(1, config.n_kv_head + 1) if config.n_kv_head % n == 0 and config.intermediate_size % n == 0]
        raise PlacementError(f"{world} ranks do not divide the model's {config.n_kv_head} kv heads and "
                             f"{config.intermediate_size} intermediate columns: run {', '.join(map(str, fits))} processes")
    return replace(config, n_head=config.n_head // world, n_kv_head=config.n_kv_head // world,
                   intermediate_size=config.intermediate_size // world, head_dim=config.head_dim)


def check_groups(config, world, group_size):
    """int4: a row-parallel shard holds whole groups of input channels, or its scales would be cut."""
    for name, inputs in (("o", config.n_head * config.head_dim), ("down", config.intermediate_size)):
        if inputs // world % group_size:
            raise PlacementError(f"int4 groups of {group_size} input channels do not split {name}'s {inputs} inputs over "
                                 f"{world} ranks ({inputs // world} a rank): quantize with a smaller --group-size or use fewer ranks")


def build(config, dtype=torch.float32, fmt=None, group_size=None, head=None, device=None):
    """A Transformer holding this rank's shard (the whole model outside torchrun), weights unset.

    Its config stays the whole model's (thresholds, sizes, the model-wide sparsity are the
    one-process model's); its modules have the shard's shapes; o and down all-reduce."""
    world = world_size()
    if world == 1:
        return Transformer(config, dtype, fmt, group_size, head, device)
    local = shard_config(config, world)
    if fmt == "int4":
        check_groups(config, world, group_size)
    model = Transformer(local, dtype, fmt, group_size, head, device)
    model.config = config
    for layer in model.layers:
        layer.attention.o.group = layer.feed_forward.down.group = dist.group.WORLD
    return model


def model_bytes(model):
    """Bytes the model's weights and tables take (a model built on the meta device costs nothing)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()  # a tied head counts once
    return sum(t.numel() * t.element_size() for t in tensors)


def check_memory(needed, free, name, device, world):
    """A model that cannot fit gets one line naming what it needs, not a CUDA out-of-memory traceback."""
    if needed + MEMORY_RESERVE > free:
        split = f"each of {world} GPUs" if world > 1 else "one GPU"
        raise PlacementError(f"{name} needs {needed / 1e9:.1f} GB of GPU memory for its weights on {split}, plus about "
                             f"{MEMORY_RESERVE / 1e9:.1f} GB for the cache and workspace; {device} has {free / 1e9:.1f} GB free: "
                             f"use an int8 checkpoint ({QUANTIZE}) or more GPUs (torchrun --nproc_per_node N)")


def shard_tensors(path, shapes):
    """Read this rank's canonical tensors, {name: shape} of the shard, from a model.safetensors: a
    tensor is cut along the one dim where the shard's shape is smaller, the rank-th piece; one of
    the same shape is read whole. Reads only the shard's bytes."""
    from safetensors import safe_open

    r, out = rank(), {}
    try:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                full = tuple(piece.get_shape())
                want = shapes.get(name, full)
                cut = [d for d, (a, b) in enumerate(zip(full, want)) if a != b]
                if not cut:
                    out[name] = piece[:]
                    continue
                d, size = cut[0], want[cut[0]]
                if len(cut) > 1 or len(full) != len(want) or full[d] != size * world_size():
                    raise CheckpointError(f"{name} {full} does not split into shards of {want}")
                out[name] = piece[(slice(None),) * d + (slice(r * size, (r + 1) * size),)]
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e})") from None
    return out


def load(path, device="cpu", dtype=torch.float32):
    """-> (this rank's model on device in dtype, thresholds at 0, metadata): the whole model outside
    torchrun. On CUDA the weights' bytes are checked against the GPU's free memory first."""
    path = checkpoint.checkpoint_file(path)
    meta = checkpoint.read_metadata(path)
    config, fmt = checkpoint.config_of(meta), checkpoint.weight_format(checkpoint.quantization_of(meta))
    with torch.device("meta"):
        shape = build(config, dtype, **fmt)
    if device.startswith("cuda"):
        check_memory(model_bytes(shape), torch.cuda.mem_get_info(device)[0], meta.get("name", path.parent.name), device, world_size())
    if world_size() == 1:
        return checkpoint.load(path, device, dtype)
    model = build(config, dtype, device=device, **fmt)
    try:
        model.load_weights(shard_tensors(path, model.canonical_shapes()))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return model.eval(), meta


def broadcast(obj):
    """obj as rank 0 has it, on every rank (any picklable object)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def read_line(prompt):
    """input(prompt) as every rank sees it: under torchrun rank 0 alone reads the terminal and sends
    the line to the others (a chat); its Ctrl-D ends every rank's chat."""
    if world_size() == 1:
        return input(prompt)
    line = None
    if rank() == 0:
        try:
            line = input(prompt)
        except EOFError:
            pass
    line = broadcast(line)
    if line is None:
        raise EOFError
    return line


def all_reduce_seconds(model, steps=20):
    """Seconds the all-reduces of one decode step take alone: two a block, of [1, 1, dim] in the
    model's dtype, back to back (eager c10d; the compiled step's are in its CUDA graph)."""
    weight = model.tok_embeddings.weight
    x = torch.zeros(1, 1, model.config.dim, dtype=weight.dtype, device=weight.device)
    sync = torch.cuda.synchronize if weight.is_cuda else (lambda: None)
    for _ in range(2 * model.config.n_layer):  # warm up: NCCL sets up its channels on first use
        dist.all_reduce(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps * 2 * model.config.n_layer):
        dist.all_reduce(x)
    sync()
    return (time.perf_counter() - t0) / steps
