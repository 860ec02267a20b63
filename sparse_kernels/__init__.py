"""Sparse GEMV for TEAL: multiply a packed weight by an input whose small entries are zeroed; and
the decode step's attention in one launch."""
from sparse_kernels.ops import (check_decode_layers, decode_attention, decode_layers, prepare_decode_layers, runs_triton,
                                 sparse_linear, warm_up, warm_up_attention)
from sparse_kernels.packed import FORMATS, GROUP_SIZES, PackedWeight, pack_weight, quantize
from sparse_kernels.reference import projection_input, rms_norm, silu_and_mul

__all__ = ["FORMATS", "GROUP_SIZES", "PackedWeight", "check_decode_layers", "decode_attention", "decode_layers", "pack_weight", "prepare_decode_layers", "projection_input", "rms_norm", "runs_triton", "silu_and_mul",
           "quantize", "sparse_linear", "warm_up", "warm_up_attention"]
