"""Perplexity under thresholds, by the TEAL paper's protocol: windows of C tokens whose first
C - E tokens are a dense context (as a prefill is) and whose last E tokens are thresholded and
scored (as decoded tokens are), the same windows for every set of thresholds."""
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm


@torch.no_grad()
def perplexity(model, windows, thresholds, scored=512):
    """windows: [n, C + 1] token ids, the extra token being the label of the last position;
    thresholds: list of [n_layer, 7] tensors, each evaluated on every window.

    -> one dict per thresholds entry: ppl, nll (mean per scored token), tokens scored, and
    measured, the [n_layer, 7] fraction of projection inputs zeroed while scoring.
    The model keeps its thresholds; its KV cache is set up for (1, C).
    """
    n, C = windows.shape[0], windows.shape[1] - 1
    if not 0 < scored < C:
        raise ValueError(f"scored tokens ({scored}) must be fewer than the window's {C}")
    device = model.tok_embeddings.weight.device
    context = torch.arange(C - scored, device=device)
    tail = torch.arange(C - scored, C, device=device)
    nll = [0.0] * len(thresholds)
    measured = torch.zeros(len(thresholds), model.config.n_layer, model.projection_sizes().numel())
    kept_thresholds = model.get_thresholds()
    model.setup_caches(1, C)
    for window in tqdm(windows, desc="perplexity", unit="window"):
        window = window.to(device)[None]  # (1, C + 1)
        # One dense prefill of the context serves every entry: the sparse tail passes below
        # write only the tail's cache slots, which the next entry overwrites.
        model(window[:, :C - scored], input_pos=context, sparse=False)
        for i, t in enumerate(thresholds):
            model.set_thresholds(t)
            model.record_sparsity(True)
            logits = model(window[:, C - scored:C], input_pos=tail, sparse=True)  # (1, E, vocab)
            nll[i] += F.cross_entropy(logits[0].float(), window[0, C - scored + 1:], reduction="sum").item()
            measured[i] += model.measured_sparsity()
    model.record_sparsity(False)
    model.set_thresholds(kept_thresholds)
    tokens = n * scored
    return [dict(ppl=math.exp(nll[i] / tokens), nll=nll[i] / tokens, tokens=tokens, measured=measured[i] / n)
            for i in range(len(thresholds))]


def model_wide(measured, sizes):
    """[n_layer, 7] measured sparsity -> one number: each projection weighted by its weight count."""
    return float((measured.double() * sizes).sum() / (sizes.sum() * measured.shape[0]))
