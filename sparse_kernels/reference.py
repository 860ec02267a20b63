"""Plain-torch sparse linear: the definition the kernels are tested against, and the path for
devices and shapes that have no kernel."""
import torch


def segment_thresholds(thresholds, splits, device):
    """thresholds (float, 0-d or [n_segments]) -> fp32 [n_segments] on device."""
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
