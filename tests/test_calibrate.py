"""scripts/calibrate.py on a tiny checkpoint: what it keeps of the file it replaces, its passes and
their interpolation, resuming after an interruption; and Ctrl-C in the long-running scripts
(calibrate, greedy_search; convert_gguf's is in test_convert.py): one line, exit code 130, finished
work kept."""
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import generate
import thresholds
from checkpoint import load as load_checkpoint
from generate import cli
from scripts import calibrate, greedy_search
from tests.helpers import REPO, random_model, random_windows, tiny_checkpoint
from thresholds import calibration, greedy

TEXT = REPO / "README.md"  # the tiny checkpoint's tokenizer is byte-level: any text will do
ARGS = ["--text", str(TEXT), "--windows", "3", "--window-length", "64", "--skip", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny checkpoint whose thresholds.json also has greedy rows, made once."""
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("made") / "tiny")
    model, _ = load_checkpoint(ckpt)
    table = thresholds.load(ckpt / "thresholds.json")
    rows, row_thresholds, errors = greedy.greedy_search(model, random_windows(model, 1, 32, seed=4), table, 8, step=0.1)
    replace(table, greedy=rows, greedy_thresholds=row_thresholds, greedy_error=errors, greedy_search=dict(step=0.1)).save(ckpt / "thresholds.json")
    return ckpt


@pytest.fixture
def ckpt(made, tmp_path):
    return Path(shutil.copytree(made, tmp_path / "tiny"))


def run(capsys, main, *argv):
    """-> (exit code, stdout, stderr) of a script's command line, run in this process."""
    code = 0
    try:
        cli(main, [*map(str, argv)])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_keeps_the_greedy_rows_of_the_file_it_replaces(ckpt, capsys):
    before = thresholds.load(ckpt / "thresholds.json")
    code, out, err = run(capsys, calibrate.main, "--checkpoint", ckpt, *ARGS)
    assert code == 0, err
    after = thresholds.load(ckpt / "thresholds.json")
    assert not torch.equal(after.uniform, before.uniform)  # recalibrated on other text
    assert after.greedy_search == before.greedy_search and "kept the greedy rows" in out
    for a, b in zip(after.greedy + after.greedy_thresholds + after.greedy_error, before.greedy + before.greedy_thresholds + before.greedy_error):
        assert torch.equal(a, b)
    assert after.serves("greedy") == "greedy"
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "thresholds.json", "tokenizer.tiktoken", "tokenizer_config.json"]


def test_refuses_to_replace_another_file_without_force(ckpt, tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text('{"not": "thresholds"}')
    code, _, err = run(capsys, calibrate.main, "--checkpoint", ckpt, *ARGS, "--out", other)
    assert code == 1 and err.strip().splitlines() == [f"error: {other} is not a teal-thresholds file; --force replaces it"]
    assert other.read_text() == '{"not": "thresholds"}'
    code, out, err = run(capsys, calibrate.main, "--checkpoint", ckpt, *ARGS, "--out", other, "--force")
    assert code == 0, err
    assert thresholds.load(other).greedy is None and f"generate.py reads it with --thresholds {other}" in out


def test_a_new_file_beside_the_checkpoint_says_it_now_wins(ckpt, tmp_path, capsys, monkeypatch):
    """A shipped file serves the checkpoint until calibrate writes one beside it: calibrate says so,
    keeps the shipped greedy rows, and generate.py's loaded line names the file and method it uses."""
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (ckpt / "thresholds.json").rename(shipped / "tiny-test.json")
    monkeypatch.setattr(thresholds.store, "SHIPPED", shipped)
    code, out, err = run(capsys, calibrate.main, "--checkpoint", ckpt, *ARGS)
    assert code == 0, err
    assert f"generate.py now reads {ckpt / 'thresholds.json'} for this checkpoint instead of {shipped / 'tiny-test.json'}" in out
    for method, served in (("greedy", "greedy"), ("uniform", "uniform")):
        code, _, err = run(capsys, generate.main, "--checkpoint", ckpt, "--sparsity", 0.5, "--method", method, "--prompt", "hi",
                           "--max-new-tokens", 2, "--device", "cpu")
        assert code == 0 and f"thresholds for sparsity 0.5 ({served}) from {ckpt / 'thresholds.json'}" in err, err
    table = thresholds.load(ckpt / "thresholds.json")
    table.greedy = None
    table.save(ckpt / "thresholds.json")
    code, _, err = run(capsys, generate.main, "--checkpoint", ckpt, "--sparsity", 0.5, "--prompt", "hi", "--max-new-tokens", 2,
                       "--device", "cpu")
    assert code == 0 and "thresholds for sparsity 0.5 (uniform) from" in err, err  # asked greedy; none in the file


@pytest.fixture(scope="module")
def tiny():
    model = random_model()
    return model, random_windows(model, 4, 40, seed=1)


def test_points_between_passes_interpolate_both_passes(tiny):
    model, windows = tiny
    table = thresholds.calibrate(model, windows, skip=8)
    assert table.calibration["passes"] == [0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95]
    assert calibration.passes(thresholds.GRID, 4) == [1, 5, 9, 13, 17, 19]
    grid = thresholds.GRID
    q = {g: calibration.quantiles(calibration.observe(model, windows, 8, 1, grid[g]), grid) for g in range(1, 20, 2)}
    expected = torch.zeros_like(q[1])
    for g in range(1, 20):
        lo, hi = (g, g) if g % 2 else (g - 1, g + 1)  # 0.1: the passes at 0.05 and 0.15, each read at 0.1
        expected[..., g] = (q[lo][..., g] + q[hi][..., g]) / 2
    expected = expected.cummax(-1).values[:, calibration.input_columns(model)].float()
    assert torch.allclose(table.uniform, expected, rtol=1e-6, atol=0)


def test_resumes_after_an_interruption(tiny, tmp_path, monkeypatch):
    model, windows = tiny
    state = tmp_path / "state.json"
    whole = thresholds.calibrate(model, windows, skip=8)
    real, calls = calibration.observe, []

    def interrupted_after_two_passes(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration, "observe", interrupted_after_two_passes)
    with pytest.raises(KeyboardInterrupt):
        thresholds.calibrate(model, windows, skip=8, state_path=state)
    assert list(json.loads(state.read_text())["passes"]) == ["1", "3"]
    monkeypatch.setattr(calibration, "observe", real)
    resumed = thresholds.calibrate(model, windows, skip=8, state_path=state)
    assert torch.equal(resumed.uniform, whole.uniform)
    with pytest.raises(ValueError, match="other settings; delete it to start over"):
        thresholds.calibrate(model, windows, skip=9, state_path=state)


def interrupt(argv, ready, timeout=600):
    """Run argv (a command in a fresh process), send it SIGINT once ready(stderr so far) holds,
    -> (exit code, stderr)."""
    proc = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    err = bytearray()
    reader = threading.Thread(target=lambda: [err.extend(b) for b in iter(lambda: proc.stderr.read1(4096), b"")])
    reader.start()
    deadline = time.monotonic() + timeout
    while not ready(err.decode(errors="replace")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is not None or not ready(err.decode(errors="replace")):
        proc.kill()
        pytest.fail(f"ended, or never got ready, before it could be interrupted: {err.decode(errors='replace')}")
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout)
    reader.join()
    return code, err.decode(errors="replace")


def assert_one_line(code, err):
    assert code == 130, err
    assert "Traceback" not in err and err.rstrip().splitlines()[-1] == "interrupted", err


def test_ctrl_c_in_calibrate_keeps_the_finished_passes(ckpt):
    state = ckpt / "thresholds.json.calibrate-state.json"
    before = (ckpt / "thresholds.json").read_bytes()
    argv = [sys.executable, "-m", "scripts.calibrate", "--checkpoint", str(ckpt), *ARGS, "--windows", "8", "--stride", "1"]
    code, err = interrupt(argv, lambda err: state.is_file())
    assert_one_line(code, err)
    assert (ckpt / "thresholds.json").read_bytes() == before  # nothing replaced, nothing half-written
    passes = json.loads(state.read_text())["passes"]
    assert 1 <= len(passes) < 19
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and f"resuming: {len(passes)} of 19 passes done" in done.stderr, done.stderr
    assert not state.exists() and thresholds.load(ckpt / "thresholds.json").greedy is not None


def test_ctrl_c_in_greedy_search_keeps_the_finished_blocks(ckpt):
    out = ckpt / "greedy.json"
    state = ckpt / "greedy.json.greedy-state.json"
    argv = [sys.executable, "-m", "scripts.greedy_search", "--checkpoint", str(ckpt), "--text", str(TEXT), "--windows", "4",
            "--window-length", "64", "--tail", "16", "--step", "0.05", "--device", "cpu", "--dtype", "fp32", "--out", str(out)]
    code, err = interrupt(argv, lambda err: state.is_file())
    assert_one_line(code, err)
    assert not out.exists() and list(json.loads(state.read_text())["blocks"]) == ["0"]


def test_greedy_search_of_the_bundled_model_leaves_the_shipped_files_alone(tmp_path, monkeypatch, capsys):
    """With no --checkpoint (the bundled model, here a tiny one in its cache place) the rows go to
    the cache beside it, never into a tracked file under thresholds/files/."""
    tracked = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in thresholds.SHIPPED.glob("*.json")}
    cache = tmp_path / "cache"
    bundled = tiny_checkpoint(cache / "smollm2-135m-instruct")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.move(bundled / "thresholds.json", shipped / "tiny-test.json")
    monkeypatch.setenv("TEAL_CACHE", str(cache))
    monkeypatch.setattr(thresholds, "SHIPPED", shipped)
    monkeypatch.setattr(thresholds.store, "SHIPPED", shipped)
    before = (shipped / "tiny-test.json").read_bytes()
    code, out, err = run(capsys, greedy_search.main, "--text", TEXT, "--windows", 2, "--window-length", 48, "--tail", 16,
                         "--step", 0.1, "--device", "cpu")
    assert code == 0, err
    assert (shipped / "tiny-test.json").read_bytes() == before
    assert thresholds.load(bundled / "thresholds.json").greedy is not None and str(bundled / "thresholds.json") in out
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tracked} == tracked
