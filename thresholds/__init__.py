"""TEAL thresholds: calibrate them on text, store them in a file tied to one checkpoint, read
them back at any sparsity, and measure perplexity under them.

    t = calibrate(model, token_windows(ids, 64, 2048))      # or load(path, fingerprint=...)
    t.save(path)
    model.set_thresholds(t.at(0.5))                          # [n_layer, 7]
    t.greedy, t.greedy_thresholds, t.greedy_error = greedy_search(model, windows, t, tail=128)
    model.set_thresholds(t.at(0.5, "greedy"))                # per-projection sparsities
"""
from thresholds.calibration import GRID, SKIP, calibrate, histogram, observe, quantiles, token_windows
from thresholds.greedy import greedy_search
from thresholds.perplexity import model_wide, perplexity
from thresholds.store import FORMAT, METHODS, SHIPPED, VERSION, Thresholds, ThresholdsError, find_thresholds, load

__all__ = ["FORMAT", "GRID", "METHODS", "SHIPPED", "SKIP", "VERSION", "Thresholds", "ThresholdsError", "calibrate",
           "find_thresholds", "greedy_search", "histogram", "load", "model_wide", "observe", "perplexity", "quantiles", "token_windows"]
