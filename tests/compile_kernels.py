"""Compiles every kernel variant for the GPU the project runs on (sm_90), on the CPU, and prints
{variant: None or the compiler's error} as JSON. tests/test_kernel_compile.py runs it in a process
of its own: the test session builds the kernels for the interpreter, which runs a kernel's Python,
not Triton's compiler. Each launch's arguments are built as the launcher builds them."""
import json
import traceback

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparse_kernels import attention, gemv
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


def gemv_variant(fmt, form, compact):
    M, splits, kw = FORMS[form]
    K, N = 128, sum(splits)
    dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
    pw = pack_weight(torch.randn(N, K), fmt, splits=splits, group_size=FORMATS[fmt], dtype=dtype)
    data, scales, zeros, group = pw.kernel_tensors()
    x = torch.randn(M, 2 * K if kw.get("swiglu") else K, dtype=dtype)
    config = gemv.Config(block_n=32, block_k=16, rows_per_program=64, num_warps=4, compact=compact)
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


def variants():
    """name -> a function compiling that variant."""
    out = {f"gemv-{fmt}-{form}-{'compact' if compact else 'masked'}": (gemv_variant, (fmt, form, compact))
           for fmt in FORMATS for form in FORMS for compact in (False, True) if not (compact and FORMS[form][0] > 1)}
    out.update({f"attention-{TYPES[dtype]}": (attention_variant, (dtype,)) for dtype in (torch.bfloat16, torch.float32)})
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
