"""Sparse GEMV for TEAL: multiply a packed weight by an input whose small entries are zeroed."""
from sparse_kernels.ops import sparse_linear, warm_up
from sparse_kernels.packed import PackedWeight, pack_weight
from sparse_kernels.reference import projection_input, rms_norm, silu_and_mul

__all__ = ["PackedWeight", "pack_weight", "projection_input", "rms_norm", "silu_and_mul", "sparse_linear", "warm_up"]
