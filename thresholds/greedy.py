"""Block-wise greedy sparsity allocation (the TEAL paper's Algorithm 1).

Each block is searched alone. Its inputs X are the dense model's hidden states at that block
over calibration windows; its target Y is the dense block's output. Every window's prefix runs
dense into the block's KV cache, as a prefill does, and only its tail is thresholded and scored,
as decoded tokens are. Starting with all seven sparsities at 0, each step tries raising each
projection's sparsity by a step inversely proportional to its share of the block's weights (so
every try skips the same number of weight bytes), keeps the try with the smallest ||Y - Y_s||
on the tail, and records a row: the effective sparsity (weight-weighted mean) and the seven.

The thresholds of a try, and of the rows stored: q, k, v, gate and up read theirs off the
uniform table (Thresholds.for_sparsities), the refined one, whose threshold for sparsity s was
read with everything upstream thresholded at s, as decode runs. o and down cannot: their inputs
come from projections of the same block (q, k, v; gate, up) that a greedy row holds at other
sparsities than theirs, which the table never saw. Read off the table, down's threshold at
s_down = 0.66 (its row at model-wide 0.4) assumes gate and up at 0.66 too; with them at 0.3,
down's input is less shrunk, and down measured 0.545 on held-out text. So o's and down's
thresholds are the s-quantiles of their inputs as the try itself produces them (tail positions
of the calibration windows), and a row stores its seven thresholds beside its sparsities.

Why dense X: one search then serves every model-wide sparsity (upstream blocks at 0.4 or 0.6
would give different X, so propagating sparse outputs needs one search per target sparsity),
and it is what TEAL's reference does.
"""
import json
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import atomic_write_text
from model import KVCache, observing

STEP = 0.01  # effective sparsity added per step
TOP = 0.9  # search until the block's effective sparsity reaches this


def step_sizes(sizes, step):
    """sizes: [7] weights per projection -> [7] sparsity steps; raising projection j by its step
    skips a fraction `step` of the block's weights."""
    sizes = torch.as_tensor(sizes, dtype=torch.float64)
    return step * sizes.sum() / sizes


def effective_sparsity(sparsities, sizes):
    """[..., 7] sparsities -> [...]: the fraction of the block's weights skipped."""
    sizes = torch.as_tensor(sizes, dtype=torch.float64)
    return (torch.as_tensor(sparsities, dtype=torch.float64) * sizes).sum(-1) / sizes.sum()


def block_thresholds(table, layer, sparsities):
    """[7] sparsities of one block -> its [7] thresholds from the uniform table."""
    full = torch.zeros(table.uniform.shape[:2], dtype=torch.float64)
    full[layer] = sparsities
    return table.for_sparsities(full)[layer]


def quantile_threshold(x, sparsity):
    """The threshold that zeroes a fraction `sparsity` of x's entries: the quantile of fp32 |x|."""
    a = x.float().abs().flatten()
    k = round(float(sparsity) * a.numel())
    return a.kthvalue(k).values if k > 0 else a.new_zeros(())


@torch.no_grad()
def block_tail(model, layer, x, tail, table):
    """-> run(sparsities [7]) -> (output (n, tail, dim), thresholds [7]): block `layer` on the
    last `tail` positions of x (n, T, dim), those positions thresholded; the first T - tail run
    once, dense, into a KV cache (as prefill does), which every run's tail attends to.
    q, k, v, gate and up take the table's thresholds; o and down the quantiles of their inputs.

    Leaves a KV cache on the block and its thresholds set: the caller restores them.
    """
    block, c = model.layers[layer], model.config
    n, T, _ = x.shape
    P = T - tail
    positions = torch.arange(T, device=x.device)
    mask = positions[:, None] >= positions  # (T, T): position p sees cache slots 0..p
    rope = (model.rope_cos, model.rope_sin)
    block.attention.kv_cache = KVCache(n, T, c.n_kv_head, c.head_dim, x.dtype, x.device)
    block(x[:, :P], rope, positions[:P], mask[:P], sparse=False)

    @torch.no_grad()  # run is called after block_tail returns, outside its no_grad
    def run(sparsities):
        thresholds = block_thresholds(table, layer, sparsities)

        def from_input(col):
            def observer(projection, x):  # x: this projection's input proper on the tail
                thresholds[col] = quantile_threshold(x, sparsities[col])
                projection.thresholds[0] = thresholds[col]
            return observer

        for proj, cols in block.projections():
            proj.thresholds.copy_(thresholds[cols])
        with observing({block.attention.o: from_input(3), block.feed_forward.down: from_input(6)}):
            # Writes only the tail's cache slots, which the next run overwrites.
            y = block(x[:, P:], rope, positions[P:], mask[P:], sparse=True)
        return y, thresholds
    return run


def search_block(run, sizes, step=STEP, top=TOP, cap=0.95):
    """The greedy search on one block.

    run: sparsities [7] -> (tail output, thresholds [7]) (block_tail); sizes: [7] weights per
    projection; cap: the highest sparsity a projection may reach (the uniform grid's top).
    -> (rows [K, 8] fp64: effective sparsity then the seven, from all zeros up to `top`;
        thresholds [K, 7] fp32: each row's; errors [K]: each row's block error relative to ||Y||).
    """
    s = torch.zeros(7, dtype=torch.float64)
    target, t = run(s)
    target = target.float()
    steps = step_sizes(sizes, step)
    rows, thresholds, errors = [torch.cat([torch.zeros(1, dtype=torch.float64), s])], [t], [0.0]
    while effective_sparsity(s, sizes) < top - 1e-9:
        best = None
        for j in range(7):
            if s[j] >= cap:
                continue
            trial = s.clone()
            trial[j] = min(s[j] + steps[j], cap)
            y, t = run(trial)
            err = float((y.float() - target).norm() / target.norm())
            if best is None or err < best[0]:
                best = (err, trial, t)
        err, s, t = best
        rows.append(torch.cat([effective_sparsity(s, sizes).reshape(1), s]))
        thresholds.append(t)
        errors.append(err)
    return torch.stack(rows), torch.stack(thresholds).float(), torch.tensor(errors, dtype=torch.float64)


def read_state(path, settings):
    """-> {layer: (rows, errors)} finished by an earlier run with the same settings; {} if none."""
    if path is None or not Path(path).is_file():
        return {}
    state = json.loads(Path(path).read_text())
    if state.get("settings") != settings:
        raise ValueError(f"{path} holds a search with other settings; delete it to start over")
    return {int(k): (torch.tensor(v["rows"], dtype=torch.float64), torch.tensor(v["thresholds"], dtype=torch.float32),
                     torch.tensor(v["errors"], dtype=torch.float64)) for k, v in state["blocks"].items()}


def write_state(path, settings, done):
    """Atomically: an interruption leaves the previous state whole. Full-precision floats, so a
    resumed search returns exactly what an uninterrupted one would."""
    doc = dict(settings=settings, blocks={str(k): dict(rows=r.tolist(), thresholds=t.tolist(), errors=e.tolist())
                                          for k, (r, t, e) in sorted(done.items())})
    atomic_write_text(path, json.dumps(doc))


@torch.no_grad()
def greedy_search(model, windows, table, tail, step=STEP, top=TOP, state_path=None, settings=None):
    """Greedy rows for every block of model.

    windows: [n, T] calibration token ids; table: Thresholds with the uniform grid; tail: the
    thresholded, scored positions at each window's end. With state_path, each finished block is
    written there and a rerun with the same settings (a JSON-able dict, default: the search's
    own arguments) resumes after the last finished block.
    -> (rows: [n_layer] tensors [K, 8], thresholds: [n_layer] tensors [K, 7], errors: [n_layer] tensors [K]),
    as search_block returns them for each block.
    """
    n, T = windows.shape
    if not 0 < tail < T:
        raise ValueError(f"tail ({tail}) must be shorter than the windows ({T} tokens)")
    settings = settings or dict(windows=n, window_length=T, tail=tail, step=step, top=top)
    done = read_state(state_path, settings)
    device = model.tok_embeddings.weight.device
    sizes = model.projection_sizes()
    kept_thresholds = model.get_thresholds()
    kept_caches = [block.attention.kv_cache for block in model.layers]
    x = model.tok_embeddings(windows.to(device))  # (n, T, dim): block 0's dense input
    try:
        for layer, block in enumerate(tqdm(model.layers, desc="greedy", unit="block")):
            if layer not in done:
                done[layer] = search_block(block_tail(model, layer, x, tail, table), sizes, step, top, table.grid[-1])
                block.attention.kv_cache = kept_caches[layer]
                if state_path is not None:
                    write_state(state_path, settings, done)
            x = block(x, (model.rope_cos, model.rope_sin), None, None, sparse=False)  # the next block's dense input
    finally:
        model.set_thresholds(kept_thresholds)
        for block, cache in zip(model.layers, kept_caches):
            block.attention.kv_cache = cache
    return tuple([done[i][k] for i in range(len(model.layers))] for k in range(3))
