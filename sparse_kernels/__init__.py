"""Sparse GEMV for TEAL: multiply a packed weight by an input whose small entries are zeroed."""
from sparse_kernels.ops import sparse_linear, warm_up
from sparse_kernels.packed import PackedWeight, pack_weight

__all__ = ["PackedWeight", "pack_weight", "sparse_linear", "warm_up"]
