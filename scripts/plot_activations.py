"""Distributions of the four thresholded hidden states at three depths, with the best-fitting
Gaussian and Laplace densities over each (the TEAL paper's Figure 2).

    python -m scripts.plot_activations              # the bundled model -> benchmarks/results/
    python -m scripts.plot_activations --checkpoint DIR --layers 2,15,27 --out act.png

The four states are the inputs of the block's projections: the block input after its RMSNorm
(q, k, v read it), the attention output (o), the MLP input after its RMSNorm (gate, up) and the
MLP intermediate silu(gate) * up (down). Both fits are maximum likelihood: Gaussian mean and
standard deviation; Laplace median and mean absolute deviation from it. Each panel's legend
gives the mean log-likelihood per entry of each fit: the higher, the better the fit.
"""
import argparse
import math
from pathlib import Path

import torch

import thresholds
from generate import UsageError, cli, load_model
from model import observing
from scripts.common import DATA, RESULTS, save_figure, text_files, text_windows

STATES = ("block input (q, k, v)", "attention output (o)", "MLP input (gate, up)", "MLP intermediate (down)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="checkpoint dir or model.safetensors (default: the bundled model)")
    p.add_argument("--text", type=Path, default=DATA / "calibration.txt")
    p.add_argument("--layers", help="three comma-separated block indices (default: at 1/4, 1/2 and 3/4 of the depth)")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--window-length", type=int, default=512)
    p.add_argument("--out", type=Path, help="default: benchmarks/results/activations_<name>.png")
    args = p.parse_args(argv)
    if args.windows < 1 or args.window_length <= thresholds.SKIP:
        raise UsageError(f"--windows must be at least 1 and --window-length above {thresholds.SKIP}")
    args.text = text_files([args.text], args.text)[0]
    return args


def collect(model, windows, layers):
    """-> {(layer, state): fp32 1-d tensor of that state's entries}, decode positions only (past
    the first SKIP of each window, as calibration sees them)."""
    out = {}

    def keep(layer, state):
        def observer(projection, x):  # x: the projection's input proper
            out[(layer, state)] = x[:, thresholds.SKIP:].float().flatten()
        return observer

    observers = {proj: keep(layer, i) for layer in layers for i, (proj, _) in enumerate(model.layers[layer].projections())}
    with observing(observers), torch.no_grad():
        model(windows, sparse=False)
    return out


def fits(x):
    """-> ((mean, std), (median, b)): maximum-likelihood Gaussian and Laplace parameters."""
    x = x.double()
    median = x.median()
    return (x.mean().item(), x.std().item()), (median.item(), (x - median).abs().mean().item())


def gaussian_logpdf(x, mean, std):
    return -0.5 * ((x - mean) / std) ** 2 - math.log(std * math.sqrt(2 * math.pi))


def laplace_logpdf(x, median, b):
    return -(x - median).abs() / b - math.log(2 * b)


def plot(values, layers, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(layers), len(STATES), figsize=(4 * len(STATES), 3 * len(layers)), dpi=100)
    for row, layer in enumerate(layers):
        for col, state in enumerate(STATES):
            ax, x = axes[row][col], values[(layer, col)]
            (mean, std), (median, b) = fits(x)
            # The central 99%: a single outlier channel (1/576 of the entries in a small model)
            # would stretch the axis and squash the bulk. Fits and likelihoods use every entry.
            sample = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
            lo, hi = torch.quantile(sample, torch.tensor([0.005, 0.995])).tolist()
            ax.hist(x.numpy(), bins=200, range=(lo, hi), density=True, color="lightgray")
            grid = torch.linspace(lo, hi, 400, dtype=torch.float64)
            x64 = x.double()
            ll_g, ll_l = gaussian_logpdf(x64, mean, std).mean().item(), laplace_logpdf(x64, median, b).mean().item()
            ax.plot(grid, gaussian_logpdf(grid, mean, std).exp(), label=f"Gaussian (LL {ll_g:.2f})")
            ax.plot(grid, laplace_logpdf(grid, median, b).exp(), label=f"Laplace (LL {ll_l:.2f})")
            ax.set_title(f"block {layer}: {state}", fontsize=10)
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(path, fig)


def main(argv=None):
    args = parse_args(argv)
    model, meta, tokenizer, ckpt = load_model(args.checkpoint, "cpu", torch.float32)
    n_layer = model.config.n_layer
    try:
        layers = [int(v) for v in args.layers.split(",")] if args.layers else [n_layer // 4, n_layer // 2, 3 * n_layer // 4]
    except ValueError:
        raise UsageError(f"--layers expects comma-separated block indices, got {args.layers!r}") from None
    if any(not 0 <= i < n_layer for i in layers):
        raise UsageError(f"--layers must be in 0..{n_layer - 1}, got {args.layers}")
    length = min(args.window_length, model.config.block_size)
    _, windows = text_windows(tokenizer, [args.text], args.windows, length)
    name = meta.get("name", ckpt.parent.name)
    out = args.out or RESULTS / f"activations_{name}.png"
    values = collect(model, windows, layers)
    plot(values, layers, f"{name}: projection inputs on {args.text.name} ({args.windows} windows of {length}, dense)", out)
    print(f"wrote {out}")


if __name__ == "__main__":
    cli(main)
