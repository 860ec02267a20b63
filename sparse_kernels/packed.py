"""A linear layer's weight in the layout the sparse kernels read, in one of five formats.

The weight of nn.Linear is [out, in]: that canonical form is what checkpoints store, and packing
into the kernels' layout happens at load (`load`), so a layout change never touches a file. A
thresholded input zeroes whole input channels, so the kernels want one input channel's weights
contiguous: every format stores W transposed, input channel k is row k of `data`, and a skipped
channel is one skipped contiguous row.

Formats (W is what the kernels multiply by, `dequantize()`):
- fp32, bf16, fp16: data [in, out] in that dtype; W = data.T.
- int8: data int8 [in, out], scales fp32 [out]: W[o, k] = data[k, o] * scales[o] (symmetric, one
  scale per output channel, so the kernel scales a column's sum once, after the loop).
- int4: group-wise along the input dimension, a group a run of group_size input channels (the last
  one may be shorter), so a tile of rows within a group shares one scale and one zero a column:
  W[o, k] = (q[k, o] - zeros[g, o]) * scales[g, o], g = k // group_size, q and zeros in 0..15
  (exact in fp32: a 4-bit difference times an 11-bit scale). data uint8 [in, out_bytes] holds q
  two a byte along the output dimension (low nibble: the even column), each segment starting on a
  byte of its own (a segment of odd width ends in half a byte), so a row of a segment is
  contiguous bytes; scales fp16 and zeros uint8, [n_groups, out].

Canonical tensors (`canonical()`, what a checkpoint stores, each with out rows, so fused segments
concatenate along dim 0): float {"weight": [out, in]}; int8 {"weight": int8 [out, in], "scales":
fp32 [out]}; int4 {"weight": uint8 [out, ceil(in / 2)] two input channels a byte (low nibble: the
even one), "scales": fp16 [out, n_groups], "zeros": uint8 [out, n_groups] in 0..15}.
`quantize(W, fmt, group_size)` makes them by round-to-nearest.

A PackedWeight may hold several output segments side by side (q, k and v of one block; gate and
up), each with its own threshold: `splits` lists the segment widths, summing to out_features.
"""
import torch
from torch import nn

FLOAT_FORMATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZED_FORMATS = ("int8", "int4")
FORMATS = (*FLOAT_FORMATS, *QUANTIZED_FORMATS)
GROUP_SIZES = (32, 64, 128)  # int4: powers of two that whole kernel tiles (16 to 64 rows) divide


def n_groups(in_features, group_size):
    return -(-in_features // group_size)


def segment_bytes(splits):
    """int4: each segment's first byte column and the total: a segment of width w takes ceil(w / 8)
    4-byte words (the kernel reads eight nibbles a word)."""
    starts, total = [], 0
    for w in splits:
        starts.append(total)
        total += -(-w // 8) * 4
    return starts, total


class PackedWeight(nn.Module):
    def __init__(self, out_features, in_features, fmt="bf16", splits=None, device=None, dtype=None, group_size=None):
        """dtype: the activations' dtype, which quantized formats compute in (float formats: their
        own); group_size: int4's input channels a group (one of GROUP_SIZES)."""
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}; expected one of {', '.join(FORMATS)}")
        splits = tuple(splits) if splits is not None else (out_features,)
        if sum(splits) != out_features or min(splits) <= 0:
            raise ValueError(f"splits {splits} do not partition {out_features} output features")
        if fmt == "int4" and group_size not in GROUP_SIZES:
            raise ValueError(f"int4 needs a group size in {GROUP_SIZES}, got {group_size}")
        self.out_features, self.in_features, self.splits = out_features, in_features, splits
        self.quantized = fmt if fmt in QUANTIZED_FORMATS else None
        self.group_size = group_size if fmt == "int4" else None
        self.compute_dtype = dtype or torch.bfloat16  # quantized formats only; float ones follow data
        if fmt in FLOAT_FORMATS:
            self.register_buffer("data", torch.empty(in_features, out_features, dtype=FLOAT_FORMATS[fmt], device=device))
        elif fmt == "int8":
            self.register_buffer("data", torch.empty(in_features, out_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))
        else:
            groups = n_groups(in_features, group_size)
            self.register_buffer("data", torch.empty(in_features, segment_bytes(splits)[1], dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty(groups, out_features, dtype=torch.float16, device=device))
            self.register_buffer("zeros", torch.empty(groups, out_features, dtype=torch.uint8, device=device))

    @property
    def fmt(self):
        # A float format follows the storage, so model.to(dtype) keeps the name honest.
        return self.quantized or {v: k for k, v in FLOAT_FORMATS.items()}[self.data.dtype]

    @property
    def dtype(self):
        """The activations' dtype: x's, y's, and the dense product's."""
        return self.compute_dtype if self.quantized else self.data.dtype

    def canonical_shapes(self):
        """{part: shape} of the canonical tensors `load` takes, each with out_features rows."""
        out, k = self.out_features, self.in_features
        if self.fmt == "int8":
            return {"weight": (out, k), "scales": (out,)}
        if self.fmt == "int4":
            groups = n_groups(k, self.group_size)
            return {"weight": (out, (k + 1) // 2), "scales": (out, groups), "zeros": (out, groups)}
        return {"weight": (out, k)}

    @torch.no_grad()
    def load(self, tensors):
        """Pack canonical tensors (any device; float weights of any float dtype) into this weight's
        layout, in place."""
        for part, shape in self.canonical_shapes().items():
            if tuple(tensors[part].shape) != shape:
                raise ValueError(f"{part} of shape {tuple(tensors[part].shape)}, expected {shape}")
        W = tensors["weight"].to(self.data.device)
        if self.fmt in FLOAT_FORMATS:
            self.data.copy_(W.t())
        elif self.fmt == "int8":
            self.data.copy_(W.t())
            self.scales.copy_(tensors["scales"])
        else:
            q = unpack_nibbles(W, self.in_features)  # [out, in]
            starts, _ = segment_bytes(self.splits)
            for start, width, byte in zip(self._segment_starts(), self.splits, starts):
                self.data[:, byte:byte + (width + 1) // 2] = pack_nibbles(q[start:start + width].t())
            self.scales.copy_(tensors["scales"].t())
            self.zeros.copy_(tensors["zeros"].t())
        return self

    def canonical(self):
        """The canonical tensors `load` takes."""
        if self.fmt in FLOAT_FORMATS:
            return {"weight": self.data.t().contiguous()}
        if self.fmt == "int8":
            return {"weight": self.data.t().contiguous(), "scales": self.scales.clone()}
        return {"weight": pack_nibbles(self.int4_values().t()), "scales": self.scales.t().contiguous(),
                "zeros": self.zeros.t().contiguous()}

    def int4_values(self):
        """int4: q as uint8 [in, out], the segments' half-byte padding left out."""
        return int4_values(self.data, self.splits)

    def kernel_tensors(self):
        """-> (data, scales, zeros, group_size) as the kernel takes them (None, 0 where unused)."""
        # From _buffers: a missing attribute of a Module raises inside __getattr__, which costs an
        # eager call more host time than the rest of its launch.
        buffers = self._buffers
        return buffers["data"], buffers.get("scales"), buffers.get("zeros"), self.group_size or 0

    def _segment_starts(self):
        return [sum(self.splits[:i]) for i in range(len(self.splits))]

    def dequantize(self):
        """The [out, in] weight the kernels multiply by: the float formats' own; int8 and int4 in fp32."""
        return dequantize(*self.kernel_tensors(), self.splits)

    def forward(self, x):
        """Dense product x @ W.T, for prefill and the dense baseline (int8: the integers in x's dtype,
        which holds them exactly, scaled after the product; int4: dequantized per call)."""
        if self.fmt in FLOAT_FORMATS:
            return x @ self.data
        if self.fmt == "int8":
            return ((x @ self.data.to(x.dtype)).float() * self.scales).to(x.dtype)
        return x @ self.dequantize().t().to(x.dtype)

    def extra_repr(self):
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"in={self.in_features}, out={self.out_features}, fmt={self.fmt}{group}, splits={self.splits}"


def int4_values(data, splits):
    """int4 data [in, out bytes] -> q as uint8 [in, out], the segments' half-byte padding left out."""
    starts, _ = segment_bytes(splits)
    return torch.cat([unpack_nibbles(data[:, b:b + (w + 1) // 2], w) for b, w in zip(starts, splits)], dim=1)


def dequantize(data, scales, zeros, group_size, splits):
    """The kernels' tensors (PackedWeight.kernel_tensors) -> the [out, in] weight they multiply by:
    a float data's own transpose; int8 (int8 data) and int4 (uint8 data) in fp32."""
    if data.dtype == torch.int8:
        return data.t().float() * scales[:, None]
    if data.dtype != torch.uint8:
        return data.t()
    g = torch.arange(data.shape[0], device=data.device) // group_size  # [in]: each input channel's group
    return ((int4_values(data, splits).float() - zeros.float()[g]) * scales.float()[g]).t()


def pack_nibbles(q):
    """uint8 [R, C] values in 0..15 -> uint8 [R, ceil(C / 2)]: column 2j in the low nibble of byte j."""
    if q.shape[1] % 2:
        q = torch.cat([q, q.new_zeros(q.shape[0], 1)], dim=1)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed, columns):
    """pack_nibbles' inverse: uint8 [R, B] -> uint8 [R, columns]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)[:, :columns]


def quantize(W, fmt, group_size=None):
    """W: float [out, in] -> its canonical tensors in fmt, by round-to-nearest (fp32 math).

    int8: scale = max |W[o]| / 127, q = round(W / scale): within half a scale of W.
    int4: per group of input channels, over the range [min(W, 0), max(W, 0)] (so that 0 is exact),
    scale = range / 15 rounded up to fp16 (what the kernel reads; at least 2**-14, fp16's smallest
    normal), zero = round(-min / scale), q = clamp(round(W / scale) + zero, 0, 15): within half a
    scale of W, but for a group's extreme entries, within one when round-to-nearest overshoots 15."""
    W = W.float()
    if fmt == "int8":
        scales = W.abs().amax(dim=1) / 127
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = (W / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        return {"weight": q, "scales": scales}
    if fmt != "int4":
        raise ValueError(f"quantize takes int8 or int4, got {fmt!r}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 needs a group size in {GROUP_SIZES}, got {group_size}")
    out, k = W.shape
    groups = n_groups(k, group_size)
    padded = torch.nn.functional.pad(W, (0, groups * group_size - k), value=float("nan")).view(out, groups, group_size)
    lo = torch.nan_to_num(padded, nan=float("inf")).amin(dim=2).clamp(max=0)  # [out, groups]; 0 in range
    hi = torch.nan_to_num(padded, nan=float("-inf")).amax(dim=2).clamp(min=0)
    exact = ((hi - lo) / 15).clamp(min=2 ** -14)
    scales = exact.half()
    scales = torch.where(scales.float() < exact, torch.nextafter(scales, torch.full_like(scales, 1.0)), scales).float()
    zeros = (-lo / scales).round().clamp(0, 15)
    q = ((padded / scales[..., None]).round() + zeros[..., None]).clamp(0, 15)
    q = q.view(out, -1)[:, :k].to(torch.uint8)
    return {"weight": pack_nibbles(q), "scales": scales.half(), "zeros": zeros.to(torch.uint8)}


def pack_weight(W, fmt="bf16", splits=None, group_size=None, dtype=None):
    """W: float [out, in] as nn.Linear.weight -> PackedWeight on W's device (int8, int4: quantized by
    round-to-nearest, computing in dtype, by default W's)."""
    if W.dim() != 2:
        raise ValueError(f"expected a 2-d weight [out, in], got shape {tuple(W.shape)}")
    pw = PackedWeight(W.shape[0], W.shape[1], fmt, splits, device=W.device, dtype=dtype or W.dtype, group_size=group_size)
    return pw.load(quantize(W, fmt, group_size) if fmt in QUANTIZED_FORMATS else {"weight": W})
