"""Uniform calibration: run text through the model, histogram each projection input's fp32 |x|
per layer, and read the thresholds off the histograms' quantiles: from one dense pass, or (refine)
from passes at some grid sparsities, each threshold read as its input arrives with everything
upstream thresholded the same way, as decode applies them.

Histograms keep memory constant however many tokens pass (a 7B model's activations are never
stored) and work on any device. A bin is the top 16 bits of an fp32 |x|: one bin per bf16 value,
128 bins per octave, so the edges are exact floats and each bin spans under 1% of its value.
"""
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import atomic_write_text
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
def observe(model, windows, skip=SKIP, batch_size=1, sparsity=None, progress=None):
    """Histograms of every projection input's fp32 |x| over causal passes of windows through the
    blocks (lm_head is not run: nothing reads it): dense, or at a uniform `sparsity`, where each
    projection is thresholded at the `sparsity`-quantile of its input as histogrammed so far (this
    batch included), read as the input arrives. So every input downstream is shaped by upstream
    thresholds read the same way, as decode sees it, in one pass however many projections follow.

    windows: [n, T] token ids; the first `skip` positions of each are thresholded but left out of
    the histograms. progress: a tqdm bar, advanced once a batch.
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
            if sparsity is not None:  # the projection then runs with this threshold
                projection.thresholds.copy_(quantiles(counts[layer, i], [sparsity]).float().expand_as(projection.thresholds))
        return observer

    observers = {proj: count_into(layer, i) for layer, block in enumerate(model.layers)
                 for i, (proj, _) in enumerate(block.projections())}
    rope = (model.rope_cos, model.rope_sin)
    kept_thresholds = model.get_thresholds()
    try:
        with observing(observers):
            for batch in windows.split(batch_size):
                x = model.tok_embeddings(batch.to(device))  # (B, T, dim)
                for block in model.layers:
                    x = block(x, rope, None, None, sparse=sparsity is not None)
                if progress is not None:
                    progress.update(1)
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
    s = torch.tensor(sparsities, dtype=torch.float64, device=counts.device)
    rank = s * cdf[..., -1:]  # [..., S]
    k = torch.searchsorted(cdf, rank.contiguous()).clamp(max=N_BINS - 2)  # first bin with cdf >= rank
    inside = counts.gather(-1, k)
    frac = ((rank - (cdf.gather(-1, k) - inside)) / inside.clamp(min=1)).clamp(0, 1)
    lo, hi = bin_floor(k), bin_floor(k + 1)
    return torch.where(s == 0, 0.0, lo + frac * (hi - lo))


def passes(grid, stride):
    """-> the grid indices calibrate runs a pass at: every stride-th point from the first nonzero
    one, and the last, so that every other point lies between two of them."""
    at = list(range(1, len(grid), stride))
    return at if at[-1] == len(grid) - 1 else at + [len(grid) - 1]


def calibrate(model, windows, grid=GRID, skip=SKIP, batch_size=1, refine=True, stride=2, state_path=None, settings=None):
    """Uniform thresholds for a model (in memory, on any device) from passes over windows.

    windows: [n, T] token ids. Without `refine`, one dense pass gives every grid point. But
    thresholding upstream projections shrinks the inputs downstream (down's input comes from
    thresholded gate and up), so dense thresholds overshoot the sparsity they were read at; with
    `refine`, a pass at sparsity s (observe) reads each threshold off the inputs that the thresholds
    upstream of it produce, as decode sees them. Such a pass runs at every `stride`-th grid point
    (passes()); a point between two passes a < g < b is read off both at g's own sparsity and
    interpolated linearly between them by sparsity: what upstream thresholds do to an input
    changes smoothly with their sparsity, so the interpolation's error is second order in the
    spacing (stride 1: a pass at every point).
    With state_path, each finished pass is written there at once, and a rerun with the same
    settings (a JSON-able dict, default: the calibration's own arguments) resumes after it.
    -> Thresholds; name and fingerprint are left for the caller, who knows the checkpoint.
    """
    if grid[0] != 0 or any(b <= a for a, b in zip(grid, grid[1:])) or grid[-1] >= 1:
        raise ValueError(f"grid must rise from 0 to below 1, got {grid}")
    n, T = windows.shape
    cols = input_columns(model)
    n_batches = -(-n // batch_size)
    if refine:
        at = passes(grid, stride)
        settings = dict(settings or dict(windows=n, window_length=T, skip=skip, batch_size=batch_size), grid=list(grid), passes=at)
        done = read_state(state_path, settings)  # {pass index: [n_layer, 4, len(grid)] quantiles}
        todo = [a for a in at if a not in done]
        if done:
            print(f"resuming: {len(done)} of {len(at)} passes done, kept in {state_path}", file=sys.stderr)
        with tqdm(total=len(todo) * n_batches, desc=f"calibrate ({len(at)} passes)", unit="batch") as bar:
            for a in todo:
                bar.set_postfix_str(f"sparsity {grid[a]:.2f}")
                done[a] = quantiles(observe(model, windows, skip, batch_size, grid[a], bar), grid)
                if state_path is not None:
                    write_state(state_path, settings, done)
        table = torch.zeros_like(done[at[0]])
        for g in range(1, len(grid)):
            lo, hi = max(a for a in at if a <= g), min(a for a in at if a >= g)  # at[0] is 1: both exist
            w = (grid[g] - grid[lo]) / (grid[hi] - grid[lo]) if hi > lo else 0.0
            table[..., g] = (1 - w) * done[lo][..., g] + w * done[hi][..., g]
        table = table.cummax(dim=-1).values  # points read off different passes could cross by noise
    else:
        with tqdm(total=n_batches, desc="calibrate (dense)", unit="batch") as bar:
            table = quantiles(observe(model, windows, skip, batch_size, progress=bar), grid)
    calibration = dict(windows=n, window_length=T, skip_positions=skip, tokens=n * (T - skip), refined=refine,
                       **(dict(passes=[grid[a] for a in passes(grid, stride)]) if refine else {}),
                       histogram="fp32 |x|, 128 log-spaced bins per octave",
                       dtype=str(model.tok_embeddings.weight.dtype).removeprefix("torch."))
    return Thresholds(grid=list(grid), uniform=table[:, cols].float(), config=config_dict(model.config), calibration=calibration)


def read_state(path, settings):
    """-> {grid index: [n_layer, 4, len(grid)] fp64 quantiles} of the passes an earlier run with
    the same settings finished; {} if none."""
    if path is None or not Path(path).is_file():
        return {}
    state = json.loads(Path(path).read_text())
    if state.get("settings") != settings:
        raise ValueError(f"{path} holds a calibration with other settings; delete it to start over")
    return {int(g): torch.tensor(q, dtype=torch.float64) for g, q in state["passes"].items()}


def write_state(path, settings, done):
    """Atomically: an interruption leaves the previous state whole. Full-precision floats, so a
    resumed calibration returns exactly what an uninterrupted one would."""
    atomic_write_text(path, json.dumps(dict(settings=settings, passes={str(g): q.tolist() for g, q in sorted(done.items())})))
