"""The thresholds file: per (layer, projection) thresholds on a sparsity grid, tied to one model.

A JSON document (version 2):

    format        "teal-thresholds"
    version       1; a reader refuses newer versions
    name          the checkpoint's name, e.g. "smollm2-135m-instruct"
    fingerprint   the checkpoint's weight fingerprint (checkpoint.fingerprint); thresholds load
                  only onto the checkpoint they were calibrated on, or one derived from it
    config        the model config (model.ModelArgs as a dict), checked too
    calibration   how the thresholds were made: text, windows, window_length, skip_positions,
                  tokens, histogram, dtype
    projections   ["q", "k", "v", "o", "gate", "up", "down"]: the order of the second axis below
    grid          sparsities, increasing from 0: [0.0, 0.05, ..., 0.95]
    uniform       [n_layer][7][len(grid)]: the threshold t such that a fraction grid[i] of that
                  projection's input entries has fp32 |x| <= t; exactly 0 at sparsity 0

Any sparsity between grid points interpolates linearly.

Version 2 adds, optionally:

    greedy        the block-wise greedy search's result (thresholds/greedy.py):
      search      how it was made: text, windows, window_length, tail, step, inputs, dtype, ...
      rows        [n_layer][K][8]: per block, rows of (effective sparsity, then the seven
                  projections' sparsities), effective rising from 0 to at least 0.9
      thresholds  [n_layer][K][7]: each row's thresholds: q, k, v, gate, up read off the uniform
                  table at their sparsity; o and down the quantiles of their inputs with the
                  row's q, k, v and gate, up applied (the table assumes those at o's and down's
                  own sparsity, which a greedy row does not hold)
      error       [n_layer][K]: each row's block output error, relative to the dense output

At a model-wide sparsity s, "greedy" takes each block's row at effective s, interpolating
linearly between the rows around it, thresholds and sparsities alike.
A file without greedy rows (every version-1 file) serves "greedy" with uniform thresholds.
A reader of version n reads every version up to n.
"""
import json
import re
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import torch

from checkpoint import atomic_write_text
from model import PROJECTIONS

FORMAT = "teal-thresholds"
VERSION = 2
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
    greedy: list = None  # [n_layer] fp64 tensors [K, 8]: effective sparsity, then the seven; or None
    greedy_thresholds: list = None  # [n_layer] fp32 tensors [K, 7]: each row's thresholds
    greedy_error: list = None  # [n_layer] fp64 tensors [K]: each row's relative block error
    greedy_search: dict = field(default_factory=dict)  # how the greedy rows were made

    def at(self, sparsity, method="uniform"):
        """-> [n_layer, 7] fp32 thresholds for a model-wide sparsity, for model.set_thresholds.

        "greedy" uses the file's greedy rows when it has them (none before version 2), else uniform.
        """
        if method not in METHODS:
            raise ThresholdsError(f"unknown thresholds method {method!r}; expected one of {', '.join(METHODS)}")
        if self.serves(method) == "greedy":
            return self.greedy_at(sparsity, self.greedy_thresholds).float()
        n_layer = self.uniform.shape[0]
        return self.for_sparsities(torch.full((n_layer, len(PROJECTIONS)), float(sparsity), dtype=torch.float64))

    def serves(self, method):
        """The method `at` really uses for `method`: greedy only where the file has greedy rows."""
        return "greedy" if method == "greedy" and self.greedy is not None else "uniform"

    def top(self, method="uniform"):
        """The highest model-wide sparsity `at` serves with `method`."""
        if self.serves(method) == "greedy":
            return min(float(rows[-1, 0]) for rows in self.greedy)
        return self.grid[-1]

    def greedy_sparsities(self, sparsity):
        """-> [n_layer, 7] fp64: each block's seven sparsities at effective `sparsity` (so each
        block's effective sparsity is exactly it)."""
        return self.greedy_at(sparsity, [rows[:, 1:] for rows in self.greedy])

    def greedy_at(self, sparsity, values):
        """values: [n_layer] tensors [K, 7], one line per greedy row -> [n_layer, 7] fp64: each
        block's line at effective `sparsity`, interpolated linearly between the rows around it."""
        top = min(float(rows[-1, 0]) for rows in self.greedy)
        if not 0 <= sparsity <= top:
            raise ThresholdsError(f"greedy sparsity must be in [0, {top:g}] (the searched rows), got {sparsity:g}; use uniform above")
        out = []
        for rows, v in zip(self.greedy, values):
            lo = int(torch.searchsorted(rows[:, 0].contiguous(), torch.tensor([float(sparsity)], dtype=torch.float64), right=True)) - 1
            lo = min(lo, len(rows) - 2)
            w = (sparsity - rows[lo, 0]) / (rows[lo + 1, 0] - rows[lo, 0])
            v = v.double()
            out.append(v[lo] + w * (v[lo + 1] - v[lo]))
        return torch.stack(out)

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
        if self.greedy is not None:
            doc["greedy"] = {"search": self.greedy_search,
                             "rows": [[[float(f"{v:.9g}") for v in row] for row in rows.tolist()] for rows in self.greedy],
                             "thresholds": [[[float(f"{v:.9g}") for v in row] for row in t.tolist()] for t in self.greedy_thresholds],
                             "error": [[float(f"{v:.6g}") for v in e.tolist()] for e in self.greedy_error]}
        text = json.dumps(doc, indent=1)
        # One line per innermost list (a projection's thresholds over the grid), not per number.
        return re.sub(r"\[\s+([^\[\]]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text) + "\n"

    def save(self, path):
        """Write atomically: a reader never sees a half-written file."""
        atomic_write_text(path, self.to_json())


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
    t = Thresholds(grid=grid, uniform=uniform, config=config, name=doc.get("name", ""),
                   fingerprint=doc.get("fingerprint", ""), calibration=doc.get("calibration", {}))
    if "greedy" in doc:
        t.greedy, t.greedy_thresholds, t.greedy_error, t.greedy_search = parse_greedy(doc["greedy"], n_layer, grid[-1], where)
    return t


def parse_greedy(greedy, n_layer, top, where):
    """The greedy field -> (rows, thresholds, errors, search), checking what greedy_at relies on."""
    try:
        rows = [torch.tensor(r, dtype=torch.float64) for r in greedy["rows"]]
        thresholds = [torch.tensor(t, dtype=torch.float32) for t in greedy["thresholds"]]
        errors = [torch.tensor(e, dtype=torch.float64) for e in greedy["error"]]
        search = dict(greedy.get("search", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise ThresholdsError(f"{where} is corrupt (greedy: {type(e).__name__}: {e})") from None
    if not len(rows) == len(thresholds) == len(errors) == n_layer:
        raise ThresholdsError(f"{where} is corrupt (greedy rows, thresholds, errors for {len(rows)}, {len(thresholds)}, {len(errors)} blocks, expected {n_layer})")
    for r, t, e in zip(rows, thresholds, errors):
        if r.dim() != 2 or r.shape[0] < 2 or r.shape[1] != 1 + len(PROJECTIONS) or t.shape != (r.shape[0], len(PROJECTIONS)) or e.shape != r.shape[:1]:
            raise ThresholdsError(f"{where} is corrupt (greedy rows must be at least 2 rows of {1 + len(PROJECTIONS)} numbers, "
                                  f"with {len(PROJECTIONS)} thresholds and one error each)")
        if r[0, 0] != 0 or bool((r[:, 0].diff() <= 0).any()) or bool((r[:, 1:] < 0).any()) or bool((r[:, 1:] > top).any()):
            raise ThresholdsError(f"{where} is corrupt (greedy rows must start at 0, rise in effective sparsity, and stay in [0, {top}])")
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or bool((t[0] != 0).any()):
            raise ThresholdsError(f"{where} is corrupt (greedy thresholds must be finite, non-negative, and 0 in the first row)")
    return rows, thresholds, errors, search


def load(path, fingerprint=None, config=None):
    """Read a thresholds file; with fingerprint and/or config, refuse one made for another model.

    fingerprint: the checkpoint's, or a sequence of them (checkpoint.lineage: a derived checkpoint
    accepts the thresholds of the checkpoint it was made from)."""
    path = Path(path)
    if not path.is_file():
        raise ThresholdsError(f"thresholds file not found: {path}")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ThresholdsError(f"{path} is not valid JSON ({e}); recalibrate with scripts/calibrate.py") from None
    t = parse(doc, path)
    made_for = f"{t.name or 'another model'} (fingerprint {t.fingerprint or 'none'})"
    accepted = (fingerprint,) if isinstance(fingerprint, str) else fingerprint
    if accepted is not None and t.fingerprint not in accepted:
        raise ThresholdsError(f"{path} was calibrated for {made_for}, not this checkpoint (fingerprint {', '.join(accepted)})")
    if config is not None:
        ours = config_dict(config)
        diff = sorted(k for k in set(ours) | set(t.config) if ours.get(k) != t.config.get(k))
        if diff:
            k = diff[0]
            raise ThresholdsError(f"{path} was calibrated for {made_for}, whose config differs from this model's ({k}: {t.config.get(k)} vs {ours.get(k)})")
    return t


def find_thresholds(checkpoint_dir, fingerprint):
    """-> the thresholds file for a checkpoint, or None: <checkpoint_dir>/thresholds.json if it
    exists, else a shipped file under thresholds/files/ made for this fingerprint (or, given a
    sequence of fingerprints, for any of them, as load takes them)."""
    accepted = (fingerprint,) if isinstance(fingerprint, str) else tuple(fingerprint)
    local = Path(checkpoint_dir) / "thresholds.json"
    if local.is_file():
        return local
    for path in sorted(SHIPPED.glob("*.json")):
        try:
            if json.loads(path.read_text()).get("fingerprint") in accepted:
                return path
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue  # a broken shipped file is reported when it is loaded by name, not here
    return None
