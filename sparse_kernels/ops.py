"""sparse_linear as a torch custom op, so torch.compile keeps it whole and CUDA graphs capture it.

Dispatch, per call:
- CUDA tensors, and CPU tensors when TRITON_INTERPRET=1 (how CI runs the kernel), with at most
  MAX_ROWS rows of x: the Triton kernel (sparse_kernels/gemv.py), which reads the union of the
  rows' active channels, and adds the residual; with one row (decode) it also runs the prologue
  (RMSNorm or SwiGLU) and the kept count in the same launch, else those run in torch before it;
- more rows (prefill, large batches): a dense matmul on the masked input, one per segment. The
  union of 17+ rows' active channels is nearly every channel, so skipping rows buys little there,
  while tensor cores turn the product from bandwidth- into compute-bound;
- plain CPU, up to MAX_KERNEL_ROWS rows, float or int8 weights: the C++ kernel (sparse_kernels/cpu.py),
  prologue, residual and count included, where it could be built and TEAL_CPU_KERNEL is not 0;
  else, and for int4 weights, the torch reference.
"""
import os
from typing import Optional

import torch

from sparse_kernels import cpu
from sparse_kernels.packed import dequantize
from sparse_kernels.reference import count_kept, projection_input, segment_thresholds, sparse_linear_reference

MAX_KERNEL_ROWS = 16


def triton_interpret():
    """TRITON_INTERPRET=1 routes CPU tensors through the Triton interpreter. Read per call; the
    kernel module is imported at the first Triton call, so set it before that (tests do)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_triton(device):
    """Whether calls on this device go to the Triton kernel (else the torch reference)."""
    return device.type == "cuda" or triton_interpret()


def runs_cpu_kernel(x, data, norm_weight, residual):
    """Whether this plain-CPU call goes to the C++ kernel: float weights in x's dtype, or int8 (int4
    has none), the fused tensors in x's dtype too, and the kernel there (cpu.enabled)."""
    if x.device.type != "cpu" or triton_interpret():
        return False
    if data.dtype != x.dtype and data.dtype != torch.int8 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if any(t is not None and t.dtype != x.dtype for t in (norm_weight, residual)):
        return False
    return cpu.enabled()


def _masked_matmul(x, data, thresholds, splits):
    absx = x.float().abs()
    parts, start = [], 0
    for i, width in enumerate(splits):
        xs = torch.where(absx > thresholds[i], x, torch.zeros((), dtype=x.dtype, device=x.device))
        parts.append(xs @ data[:, start:start + width])
        start += width
    return torch.cat(parts, dim=-1)


def _sparse_linear(x, data, thresholds, splits, norm_weight, norm_eps, swiglu, residual, kept, scales, zeros, group_size):
    N = sum(splits)
    x2 = x.reshape(-1, x.shape[-1])  # [M, in] (or [M, 2 * in] with swiglu)
    res2 = None if residual is None else residual.reshape(-1, N)
    M = x2.shape[0]
    if 0 < M <= MAX_KERNEL_ROWS and runs_cpu_kernel(x, data, norm_weight, residual):
        nw = None if norm_weight is None else norm_weight.contiguous()
        y = cpu.sparse_gemv(x2.contiguous(), data, thresholds.contiguous(), splits, nw, norm_eps, swiglu,
                            None if res2 is None else res2.contiguous(), kept, scales)
        return y.reshape(*x.shape[:-1], N)
    # Decode (one row): the kernel's launch makes the input and counts it; else torch does, here.
    fused = M == 1 and runs_triton(x.device)
    if not fused:
        x2 = projection_input(x2, norm_weight, norm_eps, swiglu)
        if kept is not None:
            kept += count_kept(x2, thresholds)
    if 0 < M <= MAX_KERNEL_ROWS and runs_triton(x.device):
        from sparse_kernels.gemv import sparse_gemv

        y = sparse_gemv(x2.contiguous(), data, thresholds, splits, norm_weight=norm_weight if fused else None,
                        eps=norm_eps, swiglu=swiglu and fused, residual=None if res2 is None else res2.contiguous(),
                        kept=kept if fused else None, scales=scales, zeros=zeros, group_size=group_size)
        return y.reshape(*x.shape[:-1], N)
    W = dequantize(data, scales, zeros, group_size, splits)  # [out, in]; quantized: fp32, made per call
    if M == 0:
        y = x2.new_empty(0, N)
    elif M > MAX_KERNEL_ROWS:
        y = _masked_matmul(x2, W.t().to(x2.dtype), thresholds, splits)
    else:
        y = sparse_linear_reference(x2, W, thresholds, splits)
    if res2 is not None:
        y = res2 + y
    return y.reshape(*x.shape[:-1], N)


def _dense_linear(x, weight):
    x2 = x.reshape(-1, x.shape[-1])
    if not 0 < x2.shape[0] <= MAX_KERNEL_ROWS or weight.dtype != x.dtype or not runs_cpu_kernel(x, weight, None, None):
        return torch.nn.functional.linear(x, weight)
    return cpu.dense_linear(x2.contiguous(), weight.contiguous()).reshape(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("teal::dense_linear", mutates_args=())
def dense_linear_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _dense_linear(x, weight)


@dense_linear_op.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def dense_linear(x, weight):
    """x @ weight.T for a float weight [out, in] in x's dtype: the sparse step's lm_head (dense: it
    is never thresholded), read in place, so the tied embedding needs no second, packed copy. On
    plain CPU, up to MAX_KERNEL_ROWS rows, the C++ kernel: MKL's GEMV of this layout reads 10 GB/s
    on the 2-core machine, the kernel 25 (sparse_kernels/README.md, CPU kernel); elsewhere
    F.linear. Compiled on the CPU, a custom op around the same dispatch; on a GPU, inductor's mm."""
    if not torch.compiler.is_compiling():
        return _dense_linear(x, weight)
    if x.device.type == "cpu":
        return dense_linear_op(x, weight)
    return torch.nn.functional.linear(x, weight)


# Two ops, with and without the kept count: inductor cannot lower a mutated argument that may be None.
@torch.library.custom_op("teal::sparse_linear", mutates_args=())
def sparse_linear_op(x: torch.Tensor, data: torch.Tensor, thresholds: torch.Tensor, splits: list[int],
                     norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 0.0, swiglu: bool = False,
                     residual: Optional[torch.Tensor] = None, scales: Optional[torch.Tensor] = None,
                     zeros: Optional[torch.Tensor] = None, group_size: int = 0) -> torch.Tensor:
    return _sparse_linear(x, data, thresholds, splits, norm_weight, norm_eps, swiglu, residual, None, scales, zeros, group_size)


@torch.library.custom_op("teal::sparse_linear_counted", mutates_args=("kept",))
def sparse_linear_counted_op(x: torch.Tensor, data: torch.Tensor, thresholds: torch.Tensor, splits: list[int],
                             kept: torch.Tensor, norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 0.0,
                             swiglu: bool = False, residual: Optional[torch.Tensor] = None,
                             scales: Optional[torch.Tensor] = None, zeros: Optional[torch.Tensor] = None,
                             group_size: int = 0) -> torch.Tensor:
    return _sparse_linear(x, data, thresholds, splits, norm_weight, norm_eps, swiglu, residual, kept, scales, zeros, group_size)


@sparse_linear_op.register_fake
def _(x, data, thresholds, splits, *args, **kwargs):
    return x.new_empty(*x.shape[:-1], sum(splits))


sparse_linear_counted_op.register_fake(_)


def sparse_linear(x, pw, thresholds, *, norm_weight=None, norm_eps=0.0, swiglu=False, residual=None, kept=None):
    """y = (x * (|x| > t)) @ W.T with W = pw.dequantize(), one threshold per segment of pw.

    x: [..., in] in the weight's dtype (pw.dtype; int8 and int4 weights compute in the dtype they
    were packed for); thresholds: float, 0-d tensor or [len(pw.splits)] tensor (pass tensors under
    torch.compile: a float is baked into the graph). y: [..., out] in x's dtype.

    Fused around it, so that a decode step needs no kernels of its own for them:
    - norm_weight, norm_eps: the input is RMSNorm(x) * norm_weight (x: the residual stream);
    - swiglu: x is [..., 2 * in] = [gate | up] and the input is silu(gate) * up;
    - residual: [..., out]; returns residual + y (y rounded to x's dtype first);
    - kept: int64 [len(pw.splits)]; adds how many input entries each segment's threshold kept.
    Each is computed as reference.projection_input / count_kept do, rounded the same way.

    Outside torch.compile the call goes straight to the launcher: the custom op's Python dispatch
    costs more host time than a small GEMV takes on the GPU. Under compile, the op keeps it whole.
    """
    in_features = pw.in_features * (2 if swiglu else 1)
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_features}")
    t = segment_thresholds(thresholds, pw.splits, x.device)
    data, scales, zeros, group_size = pw.kernel_tensors()
    if not torch.compiler.is_compiling():
        return _sparse_linear(x, data, t, pw.splits, norm_weight, norm_eps, swiglu, residual, kept, scales, zeros, group_size)
    if kept is None:
        return sparse_linear_op(x, data, t, list(pw.splits), norm_weight, norm_eps, swiglu, residual, scales, zeros, group_size)
    return sparse_linear_counted_op(x, data, t, list(pw.splits), kept, norm_weight, norm_eps, swiglu, residual, scales, zeros,
                                    group_size)


@torch.library.custom_op("teal::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention_op(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, pos: torch.Tensor, n_head: int, n_kv_head: int) -> torch.Tensor:
    from sparse_kernels.attention import decode_attention as launch

    return launch(qkv, k_cache, v_cache, cos, sin, pos, n_head, n_kv_head)


@decode_attention_op.register_fake
def _(qkv, k_cache, v_cache, cos, sin, pos, n_head, n_kv_head):
    return qkv.new_empty(qkv.shape[0], n_head * k_cache.shape[-1])


def decode_attention(qkv, k_cache, v_cache, cos, sin, pos, n_head, n_kv_head):
    """One decode step's attention in one Triton launch (sparse_kernels/attention.py): rope the new
    token's q and k, write its k and v into the caches' slot pos, attend over slots 0..pos.

    qkv: [B, (n_head + 2 n_kv_head) * D]; caches [B, n_kv_head, S, D]; cos, sin: the rotary tables
    [R, D], R > pos; pos: a 1-element integer tensor, read on the device. -> [B, n_head * D].
    Triton devices only (runs_triton): elsewhere the model's torch code is the definition this
    computes. A torch custom op under torch.compile, a direct launch outside it (as sparse_linear)."""
    if not torch.compiler.is_compiling():
        from sparse_kernels.attention import decode_attention as launch

        return launch(qkv, k_cache, v_cache, cos, sin, pos, n_head, n_kv_head)
    return decode_attention_op(qkv, k_cache, v_cache, cos, sin, pos, n_head, n_kv_head)


def warm_up_attention(batch_size, n_head, cache_len, head_dim, device):
    """Size the shared workspace for decode_attention at these shapes, ahead of CUDA-graph capture."""
    device = torch.device(device)
    if runs_triton(device):
        from sparse_kernels.attention import warm_up_attention as size

        size(batch_size, n_head, cache_len, head_dim, device)


def warm_up(pw, device=None, max_rows=MAX_KERNEL_ROWS):
    """Compile the kernel variants and size the shared workspace for pw, for 1 and up to max_rows
    rows of x. Call before torch.compile's reduce-overhead mode first runs the step (Transformer.
    setup_caches does): its warm-up run already allocates from the CUDA graph's private pool, and
    a workspace allocated there is an untracked live tensor that cudagraph trees refuse."""
    device = torch.device(device or pw.data.device)
    if not runs_triton(device):
        return  # the torch reference runs there: nothing to compile or size
    t = torch.zeros(len(pw.splits), device=device)
    for rows in sorted({1, min(2, max_rows), max_rows}):
        sparse_linear(torch.randn(rows, pw.in_features, device=device, dtype=pw.dtype), pw, t)


# A decode step's layers in one persistent launch (sparse_kernels/persistent.py). The tensors come
# as persistent.WEIGHT_SLOTS and MUTATED_SLOTS name them, layer after layer.
@torch.library.custom_op("teal::decode_layers", mutates_args=("mutated",))
def decode_layers_op(x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, weights: list[torch.Tensor],
                     mutated: list[torch.Tensor], splits: list[int], n_head: int, n_kv_head: int, eps: float, group_size: int,
                     count: bool) -> torch.Tensor:
    from sparse_kernels.persistent import decode_layers as launch

    return launch(x, pos, cos, sin, weights, mutated, splits, n_head, n_kv_head, eps, group_size, count)


@decode_layers_op.register_fake
def _(x, *args):
    return torch.empty_like(x)


def decode_layers(x, pos, cos, sin, weights, mutated, splits, n_head, n_kv_head, eps, group_size=0, count=False):
    """Every layer of a Llama-style decode step for one token, in one persistent Triton launch:
    x = h + down(silu(gate) * up) with [gate | up] = gate_up(RMSNorm(h)), h = x + o(attention), the
    attention's q, k, v = qkv(RMSNorm(x)), each projection thresholded as sparse_linear does and
    attention as decode_attention does (rope, cache write at pos).

    x: [1, 1, dim], the residual stream entering the first layer; pos: 1-element integer tensor;
    cos, sin: rotary tables; weights: per layer, in persistent.WEIGHT_SLOTS order, the norm weights
    and each projection's kernel tensors (a missing int8/int4 one: any tensor, unread) and
    thresholds; mutated: per layer, the k and v caches [1, n_kv_head, S, head_dim] and each
    projection's kept counts (added to when count); splits: the widths of q, k, v, o, gate, up,
    down. -> x after the last layer. Triton devices only, on the tensors prepare_decode_layers took."""
    if not torch.compiler.is_compiling():
        from sparse_kernels.persistent import decode_layers as launch

        return launch(x, pos, cos, sin, weights, mutated, splits, n_head, n_kv_head, eps, group_size, count)
    return decode_layers_op(x, pos, cos, sin, weights, mutated, list(splits), n_head, n_kv_head, eps, group_size, count)


def prepare_decode_layers(x, pos, cos, sin, weights, mutated, splits, n_head, n_kv_head, eps, group_size=0):
    """Build decode_layers' step for these tensors before CUDA-graph capture (it allocates, and on a
    GPU compiles the kernel and checks that its grid is resident) -> None if it can run, else why
    not: then keep to the per-projection kernels."""
    if not runs_triton(x.device):
        return "no Triton device"
    if x.shape[:-1] != (1, 1):
        return "one sequence of one token only"
    from sparse_kernels.persistent import prepare

    return prepare(x, pos, cos, sin, weights, mutated, splits, n_head, n_kv_head, eps, group_size)


def check_decode_layers():
    """Raise if a decode_layers step gave up on a wait since the last check (syncs the device)."""
    from sparse_kernels.persistent import check

    check()
