"""Offline compile of a gemv kernel variant for sm_90a: registers + SASS of the main loop."""
import os, subprocess, sys, tempfile, importlib, importlib.util
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget

def compile_kernel(fn, signature, constexprs, div16, num_warps=4):
    attrs = {(i,): [["tt.divisibility", 16]] for i in div16}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

def sass(k):
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    return subprocess.run([f"{bindir}/nvdisasm", "-c", f.name], capture_output=True, text=True).stdout

def gemv_sig(mod):
    fn = mod._sparse_gemv_kernel
    names = fn.arg_names
    sig, div = {}, []
    for i, n in enumerate(names):
        if n.endswith("_ptr"):
            sig[n] = "*fp32" if n in ("t_ptr", "partial_ptr", "value_ptr") else "*i32" if n in ("count_ptr", "index_ptr") else "*i64" if n == "kept_ptr" else "*bf16"
            div.append(i)
        elif n == "eps":
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            if n in ("K", "N", "split1", "split2", "rows_per_split", "stride_xm", "stride_ym"):
                div.append(i)
    return fn, sig, div

if __name__ == "__main__":
    path = sys.argv[1]
    spec = importlib.util.spec_from_file_location("variant", path)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    fn, sig, div = gemv_sig(mod)
    const = dict(BLOCK_M=1, BLOCK_K=64, BLOCK_N=128, REDUCE_SPLITS=16, EVEN_N=True, DOT_FP32=False, COMPACT=False,
                 COMPACT_BLOCK=1024, NORM=False, NORM_BLOCK=1, HAS_RESIDUAL=False, COUNT=False)
    for kv in sys.argv[2:]:
        k, v = kv.split("=")
        const[k] = eval(v)
    nw = const.pop("num_warps", 4)
    for k in const: sig[k] = "constexpr"
    ker = compile_kernel(fn, sig, const, div, nw)
    text = sass(ker)
    open("benchmarks/experiments/2026-11-25/last.sass", "w").write(text)
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    open("benchmarks/experiments/2026-11-25/last.ptx", "w").write(ker.asm["ptx"])
    open("benchmarks/experiments/2026-11-25/last.ttgir", "w").write(ker.asm["ttgir"])
    out = subprocess.run([f"{bindir}/ptxas-blackwell", "-arch=sm_90a", "-v", "benchmarks/experiments/2026-11-25/last.ptx", "-o", "/dev/null"], capture_output=True, text=True)
    print([l for l in out.stderr.splitlines() if "registers" in l], "smem", ker.metadata.shared)
