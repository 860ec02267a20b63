"""Uniform calibration: run text through the model, histogram each projection input's fp32 |x|
per layer, and read the thresholds off the histograms' quantiles: first from a dense pass, then
(refine) from a pass at each grid sparsity with its own thresholds applied, as decode applies them.

Histograms keep memory constant however many tokens pass (a 7B model's activations are never
stored) and work on any device. A bin is the top 16 bits of an fp32 |x|: one bin per bf16 value,
128 bins per octave, so the edges are exact floats and each bin spans under 1% of its value.
"""
import torch
from tqdm import tqdm

from model import PROJECTIONS, observing
from thresholds.store import Thresholds, config_dict

GRID = [round(0.05 * i, 2) for i in range(20)]  # sparsities 0, 0.05, ..., 0.95
# Decode runs at later positions; the first tokens of a window (attention sinks) carry outlier
# activations no decode step sees, so they are left out of the histograms.
SKIP = 16
N_BINS = 1 << 15  # every non-negative fp32 has its top 16 bits below 2**15


def token_windows(tokens, n, length):
    """-> [n, length] ids: n non-overlapping windows spread evenly over a 1-d token sequence."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if n < 1 or n * length > tokens.numel():
        raise ValueError(f"the text has {tokens.numel()} tokens, too few for {n} windows of {length}")
    starts = torch.linspace(0, tokens.numel() - length, n).round().long()
    return torch.stack([tokens[s:s + length] for s in starts.tolist()])


def histogram(x):
    """-> [N_BINS] int64 counts of x's entries by the top 16 bits of their fp32 |x|."""
    return torch.bincount((x.float().abs().view(torch.int32) >> 16).flatten(), minlength=N_BINS)


def input_columns(model):
    """For each of the seven projections, which of its block's distinct inputs it reads:
    [0, 0, 0, 1, 2, 2, 3] (q, k, v share one input, gate and up another)."""
    cols = [0] * len(PROJECTIONS)
    for i, (_, columns) in enumerate(model.layers[0].projections()):
        for c in range(columns.start, columns.stop):
            cols[c] = i
    return cols


@torch.no_grad()
def observe(model, windows, skip=SKIP, batch_size=1, thresholds=None, desc="dense"):
    """Histograms of every projection input's fp32 |x| over causal passes of windows: dense, or
    with `thresholds` ([n_layer, 7]) applied everywhere, as decode applies them.

    windows: [n, T] token ids; the first `skip` positions of each are left out.
    -> [n_layer, 4, N_BINS] int64 counts, the 4 inputs in Block.projections() order.
    """
    if windows.shape[1] <= skip:
        raise ValueError(f"windows of {windows.shape[1]} tokens leave nothing after skipping {skip}")
    device = model.tok_embeddings.weight.device
    n_inputs = len(model.layers[0].projections())
    counts = torch.zeros(model.config.n_layer, n_inputs, N_BINS, dtype=torch.int64, device=device)

    def count_into(layer, i):
        def observer(projection, x):  # x: (B, T, in_features), the projection's input proper
            counts[layer, i] += histogram(x[:, skip:])
        return observer

    observers = {proj: count_into(layer, i) for layer, block in enumerate(model.layers)
                 for i, (proj, _) in enumerate(block.projections())}
    kept_thresholds = model.get_thresholds()
    try:
        if thresholds is not None:
            model.set_thresholds(thresholds)
        with observing(observers):
            for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch", leave=False):
                model(batch.to(device), sparse=thresholds is not None)
    finally:
        model.set_thresholds(kept_thresholds)
    return counts.cpu()


def bin_floor(k):
    """The smallest fp32 in bins k (int64 tensor), as fp64."""
    return (k << 16).to(torch.int32).view(torch.float32).double()


def quantiles(counts, sparsities):
    """counts: [..., N_BINS] -> [..., len(sparsities)] fp64: for each s the t with a fraction s of
    entries <= t, interpolated linearly inside the bin that holds it; exactly 0 at s = 0."""
    counts = counts.double()
    cdf = counts.cumsum(-1)
    s = torch.tensor(sparsities, dtype=torch.float64)
    rank = s * cdf[..., -1:]  # [..., S]
    k = torch.searchsorted(cdf, rank.contiguous()).clamp(max=N_BINS - 2)  # first bin with cdf >= rank
    inside = counts.gather(-1, k)
    frac = ((rank - (cdf.gather(-1, k) - inside)) / inside.clamp(min=1)).clamp(0, 1)
    lo, hi = bin_floor(k), bin_floor(k + 1)
    return torch.where(s == 0, 0.0, lo + frac * (hi - lo))


def calibrate(model, windows, grid=GRID, skip=SKIP, batch_size=1, refine=True):
    """Uniform thresholds for a model (in memory, on any device) from passes over windows.

    windows: [n, T] token ids. A dense pass gives every grid point's thresholds. Thresholding
    upstream projections shrinks the inputs downstream (down's input comes from thresholded gate
    and up), so dense thresholds overshoot the sparsity they were read at; with `refine`, each grid
    point gets one more pass with its thresholds applied and is re-read from the inputs that
    pass sees, as decode sees them (one more pass over the windows per grid point).
    -> Thresholds; name and fingerprint are left for the caller, who knows the checkpoint.
    """
    if grid[0] != 0 or any(b <= a for a, b in zip(grid, grid[1:])) or grid[-1] >= 1:
        raise ValueError(f"grid must rise from 0 to below 1, got {grid}")
    cols = input_columns(model)
    table = quantiles(observe(model, windows, skip, batch_size), grid)[:, cols]  # [n_layer, 7, len(grid)]
    if refine:
        for g in tqdm(range(1, len(grid)), desc="refine", unit="sparsity"):
            counts = observe(model, windows, skip, batch_size, thresholds=table[..., g].float(), desc=f"at {grid[g]:.2f}")
            table[..., g] = quantiles(counts, grid[g:g + 1])[:, cols, 0]
        table = table.cummax(dim=-1).values  # re-read separately, neighbours could cross by noise
    n, T = windows.shape
    calibration = dict(windows=n, window_length=T, skip_positions=skip, tokens=n * (T - skip), refined=refine,
                       histogram="fp32 |x|, 128 log-spaced bins per octave",
                       dtype=str(model.tok_embeddings.weight.dtype).removeprefix("torch."))
    return Thresholds(grid=list(grid), uniform=table.float(), config=config_dict(model.config), calibration=calibration)
