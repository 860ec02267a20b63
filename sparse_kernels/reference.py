"""Plain-torch sparse linear: the definition the kernels are tested against, and the path for
devices and shapes that have no kernel."""
import torch
import torch.nn.functional as F


def segment_thresholds(thresholds, splits, device):
    """thresholds (float, 0-d or [n_segments]) -> fp32 [n_segments] on device."""
    if isinstance(thresholds, torch.Tensor) and thresholds.shape == (len(splits),) and thresholds.dtype == torch.float32 \
            and thresholds.device == device:
        return thresholds  # the model's own: nothing to convert (a few microseconds an eager call)
    t = torch.as_tensor(thresholds, dtype=torch.float32, device=device).reshape(-1)
    if t.numel() == 1 and len(splits) > 1:
        t = t.expand(len(splits))
    if t.numel() != len(splits):
        raise ValueError(f"{t.numel()} thresholds for {len(splits)} weight segments")
    return t


def sparse_linear_reference(x, W, thresholds, splits):
    """y = (x * (|x| > t_s)) @ W[s].T for each output segment s, products summed in fp32.

    x: [..., in]; W: [out, in] float; thresholds: fp32 [n_segments]; returns [..., out] in x.dtype.
    """
    absx = x.float().abs()
    parts, start = [], 0
    for i, width in enumerate(splits):
        xs = torch.where(absx > thresholds[i], x.float(), 0.0)
        parts.append(xs @ W[start:start + width].float().t())
        start += width
    return torch.cat(parts, dim=-1).to(x.dtype)


def rms_norm(x, weight, eps):
    """RMSNorm as Llama computes it: the scaling in fp32, rounded to x's dtype, then times weight."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def silu_and_mul(x):
    """x: [..., 2 * hidden] = [gate | up] -> silu(gate) * up: the MLP's down-projection input."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def projection_input(x, norm_weight=None, norm_eps=0.0, swiglu=False):
    """What sparse_linear's prologue makes of x: RMSNorm(x) * norm_weight, silu_and_mul(x), or x."""
    if norm_weight is not None:
        return rms_norm(x, norm_weight, norm_eps)
    return silu_and_mul(x) if swiglu else x


def count_kept(x, thresholds):
    """int64 [n_segments]: entries of x (any leading shape) with |x| > t_s, for each segment's t_s."""
    return (x.float().abs().reshape(-1, x.shape[-1], 1) > thresholds).sum(dim=(0, 1))
