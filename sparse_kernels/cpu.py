"""The CPU sparse GEMV (cpu_kernels.cpp), registered as torch.ops.teal_cpu.sparse_gemv: built with
this machine's C++ compiler (torch.utils.cpp_extension and ninja) by scripts/setup.sh or on first
use, into $TEAL_CACHE (default ~/.cache/teal)/cpu-kernel, then loaded from there.

A C++ extension rather than numba or inductor's generated C++ (measured: sparse_kernels/README.md,
CPU kernel): it needs nothing beyond torch and the compiler, one call through the dispatcher costs
a few microseconds, and its loop is one we wrote and measured. -march=native (AVX-512 or AVX2
where the machine has them): the build folder is named after the CPU's flags, the torch version
and the source, so a cache copied to another machine, or an edited source, builds afresh.

If it cannot be built, one line on stderr says why and the torch reference path (reference.py)
runs instead. TEAL_CPU_KERNEL=0 chooses that path too, read at each call.
"""
import hashlib
import os
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# -ffp-contract=off: no fused multiply-adds, to round as the torch path does; -fopenmp: at::parallel_for's threads.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
NAME = "teal_cpu"
_loaded = None  # None: not tried yet in this process; then True or False


def build_dir():
    """The build folder: $TEAL_CACHE/cpu-kernel/torch<version>-<hash of CPU flags, build flags, source>."""
    cpu_flags = ""
    if Path("/proc/cpuinfo").is_file():
        cpu_flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    tag = hashlib.sha256(f"{cpu_flags} {FLAGS}".encode() + SOURCE.read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("TEAL_CACHE") or Path.home() / ".cache" / "teal")
    return cache / "cpu-kernel" / f"torch{torch.__version__.split('+')[0]}-{tag}"


def load():
    """Load the kernel, building it first where it is not built yet -> whether it is there. The
    first failure says why, once a process."""
    global _loaded
    if _loaded is None:
        folder = build_dir()
        library = folder / f"{NAME}.so"
        try:
            if not library.is_file():
                from torch.utils.cpp_extension import load as build

                print(f"sparse_kernels: building the CPU kernel into {folder} (once, about a minute)", file=sys.stderr)
                folder.mkdir(parents=True, exist_ok=True)
                build(NAME, [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], build_directory=str(folder),
                      is_python_module=False)
            else:
                torch.ops.load_library(str(library))
            _loaded = True
        except Exception as e:  # no compiler, no ninja, a failed compile or load: the torch path serves
            reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            print(f"sparse_kernels: the CPU kernel is unavailable ({reason[:200]}); the torch reference path runs",
                  file=sys.stderr)
            _loaded = False
    return _loaded


def enabled():
    """Whether CPU calls go to the kernel: TEAL_CPU_KERNEL is not 0, and it is built (or builds now)."""
    return os.environ.get("TEAL_CPU_KERNEL") != "0" and load()


def sparse_gemv(x, data, thresholds, splits, norm_weight=None, norm_eps=0.0, swiglu=False, residual=None, kept=None, scales=None):
    """x: [M, in] (or [M, 2 in] with swiglu), contiguous, in the weight's dtype (int8: the compute
    dtype) -> y [M, out], as ops.sparse_linear defines it, prologue, residual and count included.

    RMSNorm's rstd and SiLU of the gate are torch's own (reference.rms_norm's expression, F.silu),
    computed here: torch's vectorized sum and exp round differently from a plain C++ loop, and the
    kernel's input must be the reference's to the bit (cpu_kernels.cpp)."""
    rstd = gate = None
    if norm_weight is not None:
        rstd = torch.rsqrt(x.float().pow(2).mean(-1) + norm_eps)
    elif swiglu:
        gate = torch.nn.functional.silu(x[:, :data.shape[0]])
    out = torch.empty(x.shape[0], data.shape[1], dtype=x.dtype)
    torch.ops.teal_cpu.sparse_gemv(x, data, thresholds, splits, norm_weight, rstd, gate, residual, scales, kept, out)
    return out


def dense_linear(x, weight):
    """x [M, in] @ weight.T, weight [out, in] in x's dtype (fp32, bf16, fp16), both contiguous -> [M, out]."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    torch.ops.teal_cpu.dense_linear(x, weight, out)
    return out
