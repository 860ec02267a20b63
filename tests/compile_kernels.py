"""Compiles every kernel variant for the GPU the project runs on (sm_90), on the CPU, and prints
{variant: None or the compiler's error} as JSON. tests/test_kernel_compile.py runs it in a process
of its own: the test session builds the kernels for the interpreter, which runs a kernel's Python,
not Triton's compiler. Each launch's arguments are built as the launcher builds them."""
import json
import os
import subprocess
import sys
import tempfile
import traceback

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from model import ModelArgs, Transformer
from sparse_kernels import attention, gemv, persistent
from sparse_kernels.packed import pack_weight

TARGET = GPUTarget("cuda", 90, 32)
OPTIONS = ("num_warps", "num_stages", "maxnreg", "enable_fp_fusion")
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "i8", torch.uint8: "u8",
         torch.int32: "i32", torch.int64: "i64"}


def compile_for_gpu(kernel, args, meta):
    """triton.compile of kernel at these arguments for TARGET: tensors as pointers of their dtype,
    ints as i32, floats as fp32, meta's constexprs as they are; pointers and ints divisible by 16
    marked so, as the JIT specializes them on a GPU (what lets the compiler vectorize loads)."""
    names = kernel.arg_names
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, arg) in enumerate(zip(names, args)):
        if isinstance(arg, torch.Tensor):
            signature[name] = "*" + TYPES[arg.dtype]
            aligned = arg.data_ptr() % 16 == 0
        else:
            signature[name] = "fp32" if isinstance(arg, float) else "i32"
            aligned = isinstance(arg, int) and arg % 16 == 0
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name, value in meta.items():
        if name not in OPTIONS:
            signature[name] = "constexpr"
            constexprs[(names.index(name),)] = value
    assert len(signature) == len(names), f"unbound arguments: {set(names) - set(signature)}"
    options = {k: v for k, v in meta.items() if k in OPTIONS}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs), target=TARGET,
                          options=options)


def gpu_meta(meta, weight_dtype):
    """The launcher computes on the CPU as the interpreter needs (fp32 dots, no inline PTX); on a GPU
    a 16-bit weight multiplies in its dtype, and int4's nibbles unpack through inline PTX."""
    return {**meta, "DOT_FP32": weight_dtype == torch.float32, **({"ASM": True} if "ASM" in meta else {})}


FORMATS = {"bf16": None, "fp32": None, "int8": None, "int4": 64}  # format -> group size
FORMS = {  # name -> (rows of x, splits, sparse_gemv keywords of the form)
    "plain": (1, (96,), {}),
    "qkv": (1, (64, 16, 16), {}),
    "norm_count": (1, (64, 16, 16), {"norm": True, "count": True}),
    "swiglu_residual": (1, (96,), {"swiglu": True, "residual": True}),
    "rows": (5, (48, 48), {"residual": True}),
}


def gemv_variant(fmt, form, compact, blocks=1):
    M, splits, kw = FORMS[form]
    K, N = 128, sum(splits)
    dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
    pw = pack_weight(torch.randn(N, K), fmt, splits=splits, group_size=FORMATS[fmt], dtype=dtype)
    data, scales, zeros, group = pw.kernel_tensors()
    x = torch.randn(M, 2 * K if kw.get("swiglu") else K, dtype=dtype)
    config = gemv.Config(block_n=32, block_k=16, rows_per_program=64, num_warps=4, compact=compact, blocks_per_program=blocks)
    plan, args, _ = gemv.gemv_call(
        x, data, torch.zeros(len(splits)), splits, config=config, swiglu=kw.get("swiglu", False),
        norm_weight=torch.ones(K, dtype=dtype) if kw.get("norm") else None, eps=1e-5,
        residual=torch.zeros(M, N, dtype=dtype) if kw.get("residual") else None,
        kept=torch.zeros(len(splits), dtype=torch.int64) if kw.get("count") else None,
        scales=scales, zeros=zeros, group_size=group)
    compile_for_gpu(gemv.sparse_gemv_kernel, args, gpu_meta(plan.meta, data.dtype))


def attention_variant(dtype):
    B, n_head, n_kv_head, S, D = 1, 8, 2, 80, 64
    qkv = torch.randn(B, (n_head + 2 * n_kv_head) * D, dtype=dtype)
    cache = torch.zeros(B, n_kv_head, S, D, dtype=dtype)
    cos = torch.ones(S, D, dtype=dtype)
    grid, args, meta, _ = attention.attention_call(qkv, cache, cache.clone(), cos, cos.clone(), torch.tensor([7]), n_head, n_kv_head)
    compile_for_gpu(attention._decode_attention_kernel, args, gpu_meta(meta, dtype))


def persistent_variant(fmt, count):
    """The persistent decode kernel of a two-layer model whose widths (256 and up) give its GEMV
    phases the GPU's tile sizes (128-wide blocks, 64 rows a tile); prints ptxas's count of its
    registers, spills and shared memory on stderr (what decides how many programs are resident)."""
    group = FORMATS[fmt]
    config = ModelArgs(dim=256, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=384, vocab_size=64, block_size=128)
    dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
    model = Transformer(config, dtype=dtype, fmt=None if fmt in ("bf16", "fp32") else fmt, group_size=group)
    model.setup_caches(1, 128)
    x = torch.zeros(1, 1, config.dim, dtype=dtype)
    pos = torch.zeros(1, dtype=torch.long)
    step = persistent.Step(x, pos, *model.decode_layers_args())
    args = dict(step.args, x_ptr=x, pos_ptr=pos)
    meta = {k: v for k, v in gpu_meta(step.meta, dtype).items() if k != "maxnreg"}
    meta.update(COUNT=count, ASM=True, **({"maxnreg": persistent.MAX_REGISTERS} if persistent.MAX_REGISTERS else {}))
    kernel = persistent.persistent_decode_kernel
    compiled = compile_for_gpu(kernel, [args[name] for name in kernel.arg_names if name in args], meta)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        done = subprocess.run([get_ptxas(TARGET.arch).path, "-v", f"--gpu-name=sm_{TARGET.arch}a", f.name, "-o", os.devnull],
                              capture_output=True, text=True)
    usage = " ".join(line.split("info    : ")[-1] for line in done.stderr.splitlines() if "Used" in line or "spill" in line)
    print(f"persistent-{fmt}{'-count' if count else ''}: {usage}; shared {compiled.metadata.shared} bytes", file=sys.stderr)


def variants():
    """name -> a function compiling that variant."""
    out = {f"gemv-{fmt}-{form}-{'compact' if compact else 'masked'}": (gemv_variant, (fmt, form, compact))
           for fmt in FORMATS for form in FORMS for compact in (False, True) if not (compact and FORMS[form][0] > 1)}
    # Programs of several blocks: the loop over them around either inner loop, the fused one-row form.
    out.update({f"gemv-{fmt}-norm_count-{'compact' if compact else 'masked'}-blocks2": (gemv_variant, (fmt, "norm_count", compact, 2))
                for fmt in FORMATS for compact in (False, True)})
    out.update({f"attention-{TYPES[dtype]}": (attention_variant, (dtype,)) for dtype in (torch.bfloat16, torch.float32)})
    out.update({f"persistent-{fmt}{'-count' if count else ''}": (persistent_variant, (fmt, count))
                for fmt in FORMATS for count in (False, True)})
    return out


def main():
    results = {}
    for name, (fn, args) in variants().items():
        try:
            fn(*args)
            results[name] = None
        except Exception:  # reported, not raised: each variant's test shows its own error
            results[name] = traceback.format_exc(limit=-3)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
