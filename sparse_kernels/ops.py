"""sparse_linear as a torch custom op, so torch.compile keeps it whole and CUDA graphs capture it."""
import torch

from sparse_kernels.reference import segment_thresholds, sparse_linear_reference


@torch.library.custom_op("teal::sparse_linear", mutates_args=())
def sparse_linear_op(x: torch.Tensor, data: torch.Tensor, thresholds: torch.Tensor, splits: list[int]) -> torch.Tensor:
    return sparse_linear_reference(x, data.t(), thresholds, splits)


@sparse_linear_op.register_fake
def _(x, data, thresholds, splits):
    return x.new_empty(*x.shape[:-1], data.shape[1])


def sparse_linear(x, pw, thresholds):
    """y = (x * (|x| > t)) @ W.T with W = pw.dequantize(), one threshold per segment of pw.

    x: [..., in] in the weight's dtype; thresholds: float, 0-d tensor or [len(pw.splits)] tensor.
    """
    if x.shape[-1] != pw.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {pw.in_features}")
    t = segment_thresholds(thresholds, pw.splits, x.device)
    return sparse_linear_op(x, pw.data, t, list(pw.splits))
