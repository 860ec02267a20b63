"""Calibration and the thresholds file: tiny random models always, the default model when it and
the fetched text are available."""
from dataclasses import replace

import pytest
import torch

import thresholds
from model import PROJECTIONS, ModelArgs
from tests.helpers import REPO, SHIPPED, random_model, random_windows
from thresholds import ThresholdsError


@pytest.fixture(scope="module")
def tiny():
    model = random_model()
    # A random model's attention output shrinks with position (it averages more random values), so
    # calibrate on the positions the tests score: 32..95.
    return model, thresholds.calibrate(model, random_windows(model, 48, 96, seed=1), skip=32)


def test_histogram_quantiles_match_exact_quantiles():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0)) * 3
    t = thresholds.quantiles(thresholds.histogram(x), thresholds.GRID)
    assert t[0] == 0
    exact = torch.quantile(x.abs().double(), torch.tensor(thresholds.GRID[1:], dtype=torch.float64))
    assert torch.allclose(t[1:], exact, rtol=2e-3)
    below = torch.stack([(x.abs() <= v).double().mean() for v in t])
    assert (below - torch.tensor(thresholds.GRID, dtype=torch.float64)).abs().max() < 1e-3


def test_threshold_zero_is_exactly_dense(tiny):
    model, table = tiny
    assert torch.equal(table.at(0), torch.zeros(model.config.n_layer, len(PROJECTIONS)))
    idx = random_windows(model, 2, 40, seed=2)
    model.set_thresholds(table.at(0))
    with torch.no_grad():
        assert torch.equal(model(idx, sparse=True), model(idx, sparse=False))


def test_calibrated_sparsity_holds_on_other_tokens(tiny):
    model, table = tiny
    windows = random_windows(model, 16, 97, seed=3)
    for s in (0.25, 0.5):
        measured = thresholds.perplexity(model, windows, [table.at(s)], scored=64)[0]["measured"]
        assert (measured - s).abs().max() < 0.02, (s, measured)


def test_interpolation_between_grid_points(tiny):
    _, table = tiny
    lo, hi = table.at(0.25), table.at(0.3)
    assert torch.equal(lo, table.uniform[..., 5])
    assert torch.allclose(table.at(0.275), (lo + hi) / 2)
    assert torch.allclose(table.at(0.26), lo + 0.2 * (hi - lo))
    assert torch.equal(table.at(0.95), table.uniform[..., -1])
    mixed = torch.full(lo.shape, 0.25, dtype=torch.float64)
    mixed[0, 6] = 0.3
    assert table.for_sparsities(mixed)[0, 6] == hi[0, 6] and table.for_sparsities(mixed)[1, 6] == lo[1, 6]
    for bad in (-0.1, 0.96):
        with pytest.raises(ThresholdsError, match="sparsity must be in"):
            table.at(bad)
    with pytest.raises(ThresholdsError, match="unknown thresholds method"):
        table.at(0.5, method="random")


def test_file_round_trip(tiny, tmp_path):
    model, table = tiny
    table = replace(table, name="tiny-random", fingerprint="0123abcd")
    path = tmp_path / "t.json"
    table.save(path)
    back = thresholds.load(path, fingerprint="0123abcd", config=model.config)
    assert torch.equal(back.uniform, table.uniform)
    assert (back.grid, back.config, back.name, back.calibration) == (table.grid, table.config, table.name, table.calibration)
    assert torch.equal(back.at(0.37), table.at(0.37))
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_refuses_another_model(tiny, tmp_path):
    model, table = tiny
    path = tmp_path / "t.json"
    replace(table, name="tiny-random", fingerprint="0123abcd").save(path)
    with pytest.raises(ThresholdsError, match="calibrated for tiny-random .fingerprint 0123abcd., not this checkpoint"):
        thresholds.load(path, fingerprint="ffffffff")
    with pytest.raises(ThresholdsError, match="config differs"):
        thresholds.load(path, config=ModelArgs.from_name("tiny-tied"))


@pytest.mark.parametrize("damage, message", [
    (lambda text: text[:len(text) // 2], "not valid JSON"),
    (lambda text: text.replace('"version": 2', '"version": 99'), "version 99; this code reads up to 2"),
    (lambda text: text.replace('"format": "teal-thresholds"', '"format": "other"'), "not a teal-thresholds file"),
    (lambda text: text.replace('"uniform"', '"thresholds"'), "corrupt"),
    (lambda text: text.replace("[0.0, ", "[0.5, ", 2), "corrupt"),
])
def test_refuses_damaged_files(tiny, tmp_path, damage, message):
    _, table = tiny
    path = tmp_path / "t.json"
    path.write_text(damage(table.to_json()))
    with pytest.raises(ThresholdsError, match=message):
        thresholds.load(path)
    with pytest.raises(ThresholdsError, match="not found"):
        thresholds.load(tmp_path / "missing.json")


def test_find_thresholds(tiny, tmp_path, monkeypatch):
    _, table = tiny
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(thresholds.store, "SHIPPED", shipped)
    replace(table, fingerprint="aaaa").save(shipped / "a.json")
    (shipped / "broken.json").write_text("{")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert thresholds.find_thresholds(ckpt, "aaaa") == shipped / "a.json"
    assert thresholds.find_thresholds(ckpt, "bbbb") is None
    replace(table, fingerprint="bbbb").save(ckpt / "thresholds.json")
    assert thresholds.find_thresholds(ckpt, "bbbb") == ckpt / "thresholds.json"


def test_calibrate_script_needs_a_checkpoint(tmp_path, capsys):
    from generate import cli
    from scripts import calibrate

    text = tmp_path / "text.txt"
    text.write_text("some text")
    with pytest.raises(SystemExit) as exit:
        cli(calibrate.main, ["--checkpoint", str(tmp_path / "none"), "--text", str(text)])
    assert exit.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: checkpoint not found: {tmp_path / 'none'} (convert one with scripts/convert_gguf.py or scripts/convert_hf_checkpoint.py)"]


@pytest.fixture(scope="module")
def default(smollm2):
    model, meta = smollm2
    if not SHIPPED.is_file():
        pytest.skip(f"{SHIPPED.name} not shipped yet")
    return model, meta, thresholds.load(SHIPPED, fingerprint=meta["fingerprint"], config=model.config)


def test_default_model_finds_its_shipped_thresholds(default):
    _, meta, _ = default
    assert thresholds.find_thresholds(REPO / "no-such-dir", meta["fingerprint"]) == SHIPPED
    assert SHIPPED.stat().st_size < 1_000_000


def test_default_model_threshold_zero_is_exactly_dense(default):
    model, _, table = default
    idx = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    model.set_thresholds(table.at(0))
    with torch.no_grad():
        assert torch.equal(model(idx, sparse=True), model(idx, sparse=False))


def test_default_model_sparsity_on_heldout_text(default, heldout_ids):
    """Thresholds calibrated on the Python docs hit their sparsity on Austen, per projection."""
    model, _, table = default
    windows = thresholds.token_windows(heldout_ids, 4, 257)
    results = thresholds.perplexity(model, windows, [table.at(0.25), table.at(0.5)], scored=128)
    for s, r in zip((0.25, 0.5), results):
        per_projection = r["measured"].mean(0)
        assert (per_projection - s).abs().max() < 0.02, (s, per_projection)
