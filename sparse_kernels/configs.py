"""Launch shapes of the sparse GEMV: a table tuned on each GPU, a heuristic for the others.

A Config is one launch shape: output blocks of block_n columns; split-K programs of
rows_per_program input rows each (so split_k = cdiv(K, rows_per_program)), streamed block_k rows a
tile; num_warps; compact: pack the active channels first (wins from ~50% sparsity on for wide
blocks, costs 5-20% at 0%), else mask the weight rows of inactive channels in place;
blocks_per_program: output blocks a program takes one after another, sharing the work that depends
only on its rows (for projections whose grid would otherwise be several waves). One config
serves every sparsity of a shape, so more sparsity only ever removes loads.

TUNED holds, for each GPU by its torch.cuda.get_device_name(), the command that chose its configs
and the configs by (in_features, splits), or (in_features, splits, fmt) where a quantized format
("int8", "int4") has its own. `python -m scripts.benchmark_gemv --tune` re-tunes on the
GPU at hand and prints its entry in this form.
"""
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    block_n: int
    block_k: int
    rows_per_program: int
    num_warps: int
    compact: bool
    blocks_per_program: int = 1


LLAMA_2_7B = {"qkv": (4096, (4096, 4096, 4096)), "o": (4096, (4096,)), "gate_up": (4096, (11008, 11008)),
              "down": (11008, (4096,)), "gate": (4096, (11008,))}
LLAMA_3_8B = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336)),
              "down": (14336, (4096,)), "gate": (4096, (14336,))}
LLAMA_70B = {"qkv": (8192, (8192, 1024, 1024)), "o": (8192, (8192,)), "gate_up": (8192, (28672, 28672)),
             "down": (28672, (8192,)), "gate": (8192, (28672,))}

TUNED = {
    "NVIDIA H100 80GB HBM3": dict(
        command="python -m scripts.benchmark_gemv (tuned at 0% and 50% sparsity, bf16), 2026-11-23",
        configs={
            LLAMA_2_7B["qkv"]: Config(block_n=512, block_k=16, rows_per_program=256, num_warps=4, compact=False),
            LLAMA_2_7B["o"]: Config(block_n=128, block_k=64, rows_per_program=512, num_warps=4, compact=False),
            LLAMA_2_7B["gate_up"]: Config(block_n=512, block_k=16, rows_per_program=512, num_warps=4, compact=False),
            LLAMA_2_7B["down"]: Config(block_n=128, block_k=64, rows_per_program=1024, num_warps=4, compact=False),
            LLAMA_2_7B["gate"]: Config(block_n=128, block_k=64, rows_per_program=1024, num_warps=4, compact=False),
            LLAMA_3_8B["qkv"]: Config(block_n=128, block_k=64, rows_per_program=512, num_warps=4, compact=False),
            LLAMA_3_8B["gate_up"]: Config(block_n=1024, block_k=16, rows_per_program=1024, num_warps=8, compact=True),
            LLAMA_3_8B["down"]: Config(block_n=128, block_k=64, rows_per_program=1024, num_warps=4, compact=False),
            LLAMA_3_8B["gate"]: Config(block_n=128, block_k=64, rows_per_program=1024, num_warps=4, compact=False),
            LLAMA_70B["qkv"]: Config(block_n=512, block_k=16, rows_per_program=512, num_warps=4, compact=False),
            LLAMA_70B["o"]: Config(block_n=128, block_k=64, rows_per_program=1024, num_warps=4, compact=False),
            LLAMA_70B["gate_up"]: Config(block_n=128, block_k=64, rows_per_program=1024, num_warps=4, compact=False),
            LLAMA_70B["down"]: Config(block_n=128, block_k=64, rows_per_program=1024, num_warps=4, compact=False),
            LLAMA_70B["gate"]: Config(block_n=1024, block_k=16, rows_per_program=1024, num_warps=8, compact=True),
        }),
    "NVIDIA H200": dict(
        command="python -m scripts.benchmark_gemv (tuned at 0% and 50% sparsity, bf16), 2026-11-23; "
                "python -m scripts.benchmark_gemv --tune --models llama-3-8b --formats int8 (int4-g128) (the int8 "
                "(int4) entries), 2026-12-03; the int4 ones again by benchmark_decode --tune (int4-g128, the loop "
                "of 0c8edf7), and --models llama-70b --formats int8 (the 70B int8 ones), 2026-12-03",
        configs={
            LLAMA_2_7B["qkv"]: Config(block_n=512, block_k=16, rows_per_program=256, num_warps=4, compact=False),
            LLAMA_2_7B["o"]: Config(block_n=128, block_k=64, rows_per_program=256, num_warps=4, compact=False),
            LLAMA_2_7B["gate_up"]: Config(block_n=256, block_k=32, rows_per_program=1024, num_warps=4, compact=False),
            LLAMA_2_7B["down"]: Config(block_n=512, block_k=16, rows_per_program=256, num_warps=4, compact=False),
            LLAMA_2_7B["gate"]: Config(block_n=128, block_k=64, rows_per_program=1024, num_warps=4, compact=False),
            LLAMA_3_8B["qkv"]: Config(block_n=512, block_k=16, rows_per_program=128, num_warps=4, compact=False),
            LLAMA_3_8B["gate_up"]: Config(block_n=1024, block_k=16, rows_per_program=1024, num_warps=8, compact=True),
            LLAMA_3_8B["down"]: Config(block_n=128, block_k=64, rows_per_program=1024, num_warps=4, compact=False),
            LLAMA_3_8B["gate"]: Config(block_n=128, block_k=64, rows_per_program=1024, num_warps=4, compact=False),
            LLAMA_70B["qkv"]: Config(block_n=512, block_k=16, rows_per_program=512, num_warps=4, compact=False),
            LLAMA_70B["o"]: Config(block_n=128, block_k=64, rows_per_program=1024, num_warps=4, compact=False),
            LLAMA_70B["gate_up"]: Config(block_n=128, block_k=64, rows_per_program=1024, num_warps=4, compact=False),
            LLAMA_70B["down"]: Config(block_n=1024, block_k=16, rows_per_program=1024, num_warps=8, compact=True),
            LLAMA_70B["gate"]: Config(block_n=1024, block_k=16, rows_per_program=1024, num_warps=8, compact=True),
            (*LLAMA_3_8B["qkv"], "int8"): Config(block_n=128, block_k=64, rows_per_program=512, num_warps=4, compact=True),
            (*LLAMA_3_8B["o"], "int8"): Config(block_n=128, block_k=64, rows_per_program=256, num_warps=4, compact=False),
            (*LLAMA_3_8B["gate_up"], "int8"): Config(block_n=256, block_k=32, rows_per_program=1024, num_warps=4, compact=True),
            (*LLAMA_3_8B["down"], "int8"): Config(block_n=128, block_k=64, rows_per_program=1024, num_warps=4, compact=True),
            (*LLAMA_3_8B["gate"], "int8"): Config(block_n=128, block_k=64, rows_per_program=1024, num_warps=4, compact=True),
            (*LLAMA_3_8B["qkv"], "int4"): Config(block_n=128, block_k=64, rows_per_program=128, num_warps=1, compact=False),
            (*LLAMA_3_8B["o"], "int4"): Config(block_n=128, block_k=64, rows_per_program=128, num_warps=1, compact=False),
            (*LLAMA_3_8B["gate_up"], "int4"): Config(block_n=256, block_k=32, rows_per_program=128, num_warps=1, compact=False),
            (*LLAMA_3_8B["down"], "int4"): Config(block_n=256, block_k=32, rows_per_program=256, num_warps=1, compact=False),
            (*LLAMA_3_8B["gate"], "int4"): Config(block_n=256, block_k=16, rows_per_program=512, num_warps=2, compact=False),
            (*LLAMA_70B["qkv"], "int8"): Config(block_n=256, block_k=32, rows_per_program=1024, num_warps=4, compact=True),
            (*LLAMA_70B["o"], "int8"): Config(block_n=128, block_k=64, rows_per_program=1024, num_warps=4, compact=True),
            (*LLAMA_70B["gate_up"], "int8"): Config(block_n=512, block_k=16, rows_per_program=1024, num_warps=4, compact=True),
            (*LLAMA_70B["down"], "int8"): Config(block_n=512, block_k=16, rows_per_program=1024, num_warps=4, compact=True),
            (*LLAMA_70B["gate"], "int8"): Config(block_n=512, block_k=16, rows_per_program=1024, num_warps=4, compact=True),
        }),
}

chosen_here = {}  # configs this process set for (gpu, K, splits, fmt) (tune, benchmark variants): first choice
_told = set()  # GPU names the heuristic was announced for


def cdiv(a, b):
    return -(-a // b)


def next_power_of_2(n):
    return 1 << (n - 1).bit_length()


def default_config(K, splits, sms):
    """The heuristic for shapes and GPUs with no tuned entry: the masked loop on 128-wide blocks (the
    best dense-to-50% choice for most tuned shapes) and enough split-K programs to fill each SM 3 deep."""
    block_n = min(128, max(16, next_power_of_2(max(splits))))
    block_k = 64
    n_blocks = sum(cdiv(w, block_n) for w in splits)
    split_k = max(1, min(cdiv(3 * sms, n_blocks), cdiv(K, block_k)))
    rows = cdiv(cdiv(K, split_k), block_k) * block_k
    return Config(block_n=block_n, block_k=block_k, rows_per_program=rows, num_warps=4, compact=False)


def choose_config(K, splits, fmt, gpu, sms):
    """-> the config for a shape: this process's choice, else the table's for this GPU (gpu: its name,
    None off CUDA), else the heuristic, announced once per GPU without an entry."""
    key = (gpu, K, tuple(splits), fmt)
    if key in chosen_here:
        return chosen_here[key]
    entry = TUNED.get(gpu)
    if entry is not None:
        # A quantized format's own entry first ((K, splits, fmt)), then the shape's (tuned on bf16).
        for shape in ((K, tuple(splits), fmt), (K, tuple(splits))):
            if shape in entry["configs"]:
                return entry["configs"][shape]
    if gpu is not None and entry is None and gpu not in _told:
        _told.add(gpu)
        print(f"sparse_kernels: no tuned GEMV configs for {gpu}; using the heuristic "
              "(python -m scripts.benchmark_gemv --tune makes an entry)", file=sys.stderr)
    return default_config(K, splits, sms)


def format_entry(gpu, command, configs):
    """A TUNED entry as the source writes it: configs {(K, splits[, fmt]): Config}."""
    lines = [f'    "{gpu}": dict(', f'        command="{command}",', "        configs={"]
    lines += [f"            {key!r}: {c!r}," for key, c in configs.items()]
    return "\n".join(lines + ["        }),"])
