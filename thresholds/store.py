"""The thresholds file: per (layer, projection) thresholds on a sparsity grid, tied to one model.

A JSON document (version 1):

    format        "teal-thresholds"
    version       1; a reader refuses newer versions
    name          the checkpoint's name, e.g. "smollm2-135m-instruct"
    fingerprint   the checkpoint's weight fingerprint (model.fingerprint); thresholds load only
                  onto the checkpoint they were calibrated on
    config        the model config (model.ModelArgs as a dict), checked too
    calibration   how the thresholds were made: text, windows, window_length, skip_positions,
                  tokens, histogram, dtype
    projections   ["q", "k", "v", "o", "gate", "up", "down"]: the order of the second axis below
    grid          sparsities, increasing from 0: [0.0, 0.05, ..., 0.95]
    uniform       [n_layer][7][len(grid)]: the threshold t such that a fraction grid[i] of that
                  projection's input entries has fp32 |x| <= t; exactly 0 at sparsity 0

Any sparsity between grid points interpolates linearly. Later versions add fields (greedy rows);
a reader of version n reads every version up to n.
"""
import json
import os
import re
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import torch

from model import PROJECTIONS

FORMAT = "teal-thresholds"
VERSION = 1
METHODS = ("uniform", "greedy")
SHIPPED = Path(__file__).resolve().parent / "files"


class ThresholdsError(Exception):
    pass


@dataclass
class Thresholds:
    grid: list  # sparsities, increasing from 0
    uniform: torch.Tensor  # [n_layer, 7, len(grid)] fp32
    config: dict  # model.ModelArgs as a dict
    name: str = ""
    fingerprint: str = ""
    calibration: dict = field(default_factory=dict)

    def at(self, sparsity, method="uniform"):
        """-> [n_layer, 7] fp32 thresholds for a model-wide sparsity, for model.set_thresholds.

        "greedy" uses the file's greedy rows when it has them (none before version 2), else uniform.
        """
        if method not in METHODS:
            raise ThresholdsError(f"unknown thresholds method {method!r}; expected one of {', '.join(METHODS)}")
        n_layer = self.uniform.shape[0]
        return self.for_sparsities(torch.full((n_layer, len(PROJECTIONS)), float(sparsity), dtype=torch.float64))

    def for_sparsities(self, sparsities):
        """sparsities: [n_layer, 7], one per (layer, projection) -> [n_layer, 7] fp32 thresholds,
        each interpolated linearly between the grid points around its sparsity."""
        s = torch.as_tensor(sparsities, dtype=torch.float64)
        if s.shape != self.uniform.shape[:2]:
            raise ThresholdsError(f"sparsities of shape {tuple(s.shape)}, expected {tuple(self.uniform.shape[:2])}")
        top = self.grid[-1]
        if not bool(((s >= 0) & (s <= top)).all()):
            raise ThresholdsError(f"sparsity must be in [0, {top}] (the calibrated grid), got {s.min().item():g}..{s.max().item():g}")
        grid = torch.tensor(self.grid, dtype=torch.float64)
        lo = (torch.searchsorted(grid, s.contiguous(), right=True) - 1).clamp(max=len(grid) - 2)  # grid[lo] <= s
        w = (s - grid[lo]) / (grid[lo + 1] - grid[lo])
        table = self.uniform.double()
        t_lo, t_hi = table.gather(-1, lo[..., None])[..., 0], table.gather(-1, lo[..., None] + 1)[..., 0]
        return (t_lo + w * (t_hi - t_lo)).float()

    def to_json(self):
        doc = {"format": FORMAT, "version": VERSION, "name": self.name, "fingerprint": self.fingerprint,
               "config": self.config, "calibration": self.calibration, "projections": list(PROJECTIONS),
               "grid": [round(s, 6) for s in self.grid],
               # 9 significant digits round-trip fp32 exactly.
               "uniform": [[[float(f"{t:.9g}") for t in row] for row in layer] for layer in self.uniform.tolist()]}
        text = json.dumps(doc, indent=1)
        # One line per innermost list (a projection's thresholds over the grid), not per number.
        return re.sub(r"\[\s+([^\[\]]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text) + "\n"

    def save(self, path):
        """Write atomically: a reader never sees a half-written file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)


def config_dict(config):
    """ModelArgs or dict -> the plain dict a thresholds file stores (JSON round-tripped)."""
    return json.loads(json.dumps(asdict(config) if is_dataclass(config) else config))


def parse(doc, where):
    """A decoded JSON document -> Thresholds, checking everything a reader relies on."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ThresholdsError(f"{where} is not a {FORMAT} file")
    version = doc.get("version")
    if not isinstance(version, int) or version < 1:
        raise ThresholdsError(f"{where} has no valid version")
    if version > VERSION:
        raise ThresholdsError(f"{where} has thresholds version {version}; this code reads up to {VERSION} (update the code)")
    try:
        grid = [float(s) for s in doc["grid"]]
        uniform = torch.tensor(doc["uniform"], dtype=torch.float32)
        config, n_layer = doc["config"], doc["config"]["n_layer"]
        projections = doc["projections"]
    except (KeyError, TypeError, ValueError) as e:
        raise ThresholdsError(f"{where} is corrupt ({type(e).__name__}: {e})") from None
    if list(projections) != list(PROJECTIONS):
        raise ThresholdsError(f"{where} lists projections {projections}, expected {list(PROJECTIONS)}")
    if len(grid) < 2 or grid[0] != 0 or any(b <= a for a, b in zip(grid, grid[1:])) or grid[-1] >= 1:
        raise ThresholdsError(f"{where} is corrupt (grid must rise from 0 to below 1, got {grid})")
    if uniform.shape != (n_layer, len(PROJECTIONS), len(grid)):
        raise ThresholdsError(f"{where} is corrupt (uniform has shape {tuple(uniform.shape)}, expected ({n_layer}, {len(PROJECTIONS)}, {len(grid)}))")
    if not bool(torch.isfinite(uniform).all()) or bool((uniform.diff(dim=-1) < 0).any()) or bool((uniform[..., 0] != 0).any()):
        raise ThresholdsError(f"{where} is corrupt (thresholds must be finite, 0 at sparsity 0, and rise with sparsity)")
    return Thresholds(grid=grid, uniform=uniform, config=config, name=doc.get("name", ""),
                      fingerprint=doc.get("fingerprint", ""), calibration=doc.get("calibration", {}))


def load(path, fingerprint=None, config=None):
    """Read a thresholds file; with fingerprint and/or config, refuse one made for another model."""
    path = Path(path)
    if not path.is_file():
        raise ThresholdsError(f"thresholds file not found: {path}")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ThresholdsError(f"{path} is not valid JSON ({e}); recalibrate with scripts/calibrate.py") from None
    t = parse(doc, path)
    made_for = f"{t.name or 'another model'} (fingerprint {t.fingerprint or 'none'})"
    if fingerprint is not None and fingerprint != t.fingerprint:
        raise ThresholdsError(f"{path} was calibrated for {made_for}, not this checkpoint (fingerprint {fingerprint})")
    if config is not None:
        ours = config_dict(config)
        diff = sorted(k for k in set(ours) | set(t.config) if ours.get(k) != t.config.get(k))
        if diff:
            k = diff[0]
            raise ThresholdsError(f"{path} was calibrated for {made_for}, whose config differs from this model's ({k}: {t.config.get(k)} vs {ours.get(k)})")
    return t


def find_thresholds(checkpoint_dir, fingerprint):
    """-> the thresholds file for a checkpoint, or None: <checkpoint_dir>/thresholds.json if it
    exists, else a shipped file under thresholds/files/ made for this fingerprint."""
    local = Path(checkpoint_dir) / "thresholds.json"
    if local.is_file():
        return local
    for path in sorted(SHIPPED.glob("*.json")):
        try:
            if json.loads(path.read_text()).get("fingerprint") == fingerprint:
                return path
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue  # a broken shipped file is reported when it is loaded by name, not here
    return None
