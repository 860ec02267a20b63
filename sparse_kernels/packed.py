"""A linear layer's weight in the layout the sparse kernels read.

The weight of nn.Linear is [out, in]: that canonical form is what checkpoints store, and packing
into the kernels' layout happens at load (`load`), so a layout change never touches a file. A
thresholded input zeroes whole input channels, so the kernels want one input channel's weights
contiguous: the float formats store W transposed, `data` is [in, out] row-major, and a skipped
channel is one skipped contiguous row.

A PackedWeight may hold several output segments side by side (q, k and v of one block; gate and
up), each with its own threshold: `splits` lists the segment widths, summing to out_features.
"""
import torch
from torch import nn

FLOAT_FORMATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PackedWeight(nn.Module):
    def __init__(self, out_features, in_features, fmt="bf16", splits=None, device=None):
        super().__init__()
        if fmt not in FLOAT_FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}; expected one of {sorted(FLOAT_FORMATS)}")
        splits = tuple(splits) if splits is not None else (out_features,)
        if sum(splits) != out_features or min(splits) <= 0:
            raise ValueError(f"splits {splits} do not partition {out_features} output features")
        self.out_features, self.in_features, self.splits = out_features, in_features, splits
        self.register_buffer("data", torch.empty(in_features, out_features, dtype=FLOAT_FORMATS[fmt], device=device))

    @property
    def fmt(self):
        # Follows the storage, so model.to(dtype) keeps the format name honest.
        return {v: k for k, v in FLOAT_FORMATS.items()}[self.data.dtype]

    def canonical_shapes(self):
        """{part: shape} of the canonical tensors `load` takes, each with out_features rows."""
        return {"weight": (self.out_features, self.in_features)}

    @torch.no_grad()
    def load(self, tensors):
        """Pack canonical tensors ({"weight": [out, in]}, any float dtype and device) into this
        weight's layout, in place."""
        W = tensors["weight"]
        if tuple(W.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(W.shape)}, expected {(self.out_features, self.in_features)}")
        self.data.copy_(W.t())
        return self

    def canonical(self):
        """The canonical tensors `load` takes: {"weight": [out, in]}."""
        return {"weight": self.dequantize().contiguous()}

    def dequantize(self):
        """The [out, in] float weight the kernels multiply by."""
        return self.data.t()

    def forward(self, x):
        """Dense product x @ W.T, for prefill and the dense baseline."""
        return x @ self.data

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, fmt={self.fmt}, splits={self.splits}"


def pack_weight(W, fmt="bf16", splits=None):
    """W: [out, in] as nn.Linear.weight -> PackedWeight on W's device."""
    if W.dim() != 2:
        raise ValueError(f"expected a 2-d weight [out, in], got shape {tuple(W.shape)}")
    return PackedWeight(W.shape[0], W.shape[1], fmt, splits, device=W.device).load({"weight": W})
