"""Perplexity by the paper's protocol (thresholds.perplexity, scripts/eval_ppl.py) and the text it
reads (scripts/fetch_text.py)."""
import json
import math
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

import thresholds
from generate import cli
from tests.helpers import DATA, REPO, SHIPPED, random_model, random_windows, tiny_checkpoint


def run_script(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)


def test_token_windows_are_spread_and_disjoint():
    w = thresholds.token_windows(torch.arange(1000), 4, 100)
    assert w[:, 0].tolist() == [0, 300, 600, 900]
    assert torch.equal(w[1], torch.arange(300, 400))
    with pytest.raises(ValueError, match="too few"):
        thresholds.token_windows(torch.arange(1000), 11, 100)


def test_dense_perplexity_equals_a_plain_forward_pass():
    model = random_model("tiny-tied")
    windows = random_windows(model, 3, 65, seed=4)
    result = thresholds.perplexity(model, windows, [torch.zeros(2, 7)], scored=24)[0]
    model = random_model("tiny-tied")  # cache-free again
    with torch.no_grad():
        logits = model(windows[:, :64], sparse=False)[:, 64 - 24:]  # the scored positions
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 64 - 24 + 1:].reshape(-1))
    assert math.isclose(result["nll"], nll.item(), rel_tol=1e-5)
    assert result["tokens"] == 3 * 24 and result["measured"].abs().max() < 0.01


def test_sparse_tail_scores_like_token_by_token_decode():
    """The scored tail, run as one thresholded pass, equals decoding it one token at a time."""
    model = random_model("tiny")
    table = thresholds.calibrate(model, random_windows(model, 8, 64, seed=5), refine=False)
    window = random_windows(model, 1, 49, seed=6)
    t = table.at(0.4)
    result = thresholds.perplexity(model, window, [t], scored=16)[0]
    model.set_thresholds(t)
    with torch.no_grad():
        model(window[:, :32], input_pos=torch.arange(32), sparse=False)
        logits = torch.cat([model(window[:, p:p + 1], input_pos=torch.tensor([p])) for p in range(32, 48)], dim=1)
    nll = F.cross_entropy(logits[0], window[0, 33:])
    assert math.isclose(result["nll"], nll.item(), rel_tol=1e-5)


def test_settings_share_windows_without_leaking():
    """One context prefill serves every setting; each result equals evaluating that setting alone."""
    model = random_model("tiny")
    table = thresholds.calibrate(model, random_windows(model, 8, 64, seed=5), refine=False)
    windows = random_windows(model, 2, 49, seed=7)
    together = thresholds.perplexity(model, windows, [table.at(0.5), table.at(0.2)], scored=16)
    alone = thresholds.perplexity(model, windows, [table.at(0.2)], scored=16)
    assert math.isclose(together[1]["nll"], alone[0]["nll"], rel_tol=1e-6)
    assert torch.allclose(together[1]["measured"], alone[0]["measured"])


def test_model_wide_sparsity_weights_projections_by_size():
    model = random_model("tiny")
    sizes = model.projection_sizes()
    measured = torch.zeros(2, 7)
    measured[:, 6] = 1.0  # only down fully sparse
    assert math.isclose(thresholds.model_wide(measured, sizes), float(sizes[6] / sizes.sum()))


@pytest.mark.parametrize("args, message", [
    (["--sparsities", "0,1.2"], "error: --sparsities must each be in [0, 1), got 0,1.2"),
    (["--sparsities", "-0.1"], "error: --sparsities must each be in [0, 1), got -0.1"),
    (["--sparsities", "half"], "error: --sparsities expects comma-separated numbers, got 'half'"),
    (["--windows", "0"], "error: --windows and --scored must be at least 1"),
    (["--text", "no/such.txt"], "error: text not found: no/such.txt (run python scripts/fetch_text.py)"),
    (["--checkpoint", "no/such/dir", "--text", "scripts/eval_ppl.py"], "error: checkpoint not found: no/such/dir "
                                                              "(convert one with scripts/convert_gguf.py or scripts/convert_hf_checkpoint.py)"),
])
def test_bad_input_gives_one_line(args, message, capsys, monkeypatch):
    from scripts import eval_ppl

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit:
        cli(eval_ppl.main, args)
    assert exit.value.code == 1 and capsys.readouterr().err.strip().splitlines() == [message]


def test_fetch_text_without_apt_gives_one_line(tmp_path):
    done = subprocess.run([sys.executable, "scripts/fetch_text.py", "--data", str(tmp_path / "data"), "--cache", str(tmp_path / "cache")],
                          cwd=REPO, capture_output=True, text=True, env={"PATH": str(tmp_path)})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == "error: apt-get and dpkg-deb are needed to fetch the text (a Debian-based system)"
    assert not (tmp_path / "data").exists()


def test_r_reader_reads_a_character_vector():
    from scripts.fetch_text import RReader

    def chars(s):
        return (0x00040009).to_bytes(4, "big") + (len(s).to_bytes(4, "big") + s.encode() if s is not None else b"\xff\xff\xff\xff")
    blob = b"X\n" + (3).to_bytes(4, "big") + bytes(8) + (5).to_bytes(4, "big") + b"UTF-8"
    blob += (16).to_bytes(4, "big") + (3).to_bytes(4, "big") + chars("EMMA") + chars(None) + chars("By Jane Austen")
    assert RReader(zlib.decompress(zlib.compress(blob))).item() == ["EMMA", None, "By Jane Austen"]


def test_gutenberg_body_drops_header_and_license():
    from scripts.fetch_text import FetchError, gutenberg_body

    etext = ("\ufeffThe Project Gutenberg EBook of Moby Dick\r\n\r\n*** START OF THIS PROJECT GUTENBERG EBOOK MOBY DICK ***\r\n"
             "\r\nCall me Ishmael.\r\nSome years ago\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK MOBY DICK ***\r\nlicense\r\n")
    assert gutenberg_body(etext) == "Call me Ishmael.\nSome years ago\n"
    with pytest.raises(FetchError):
        gutenberg_body("Call me Ishmael.\r\n")


def test_calibration_prose_is_moby_dick_not_austen():
    if not (DATA / "calibration_prose.txt").is_file():
        pytest.skip("no calibration prose: run python scripts/fetch_text.py")
    text = (DATA / "calibration_prose.txt").read_text()
    assert "Call me Ishmael." in text and "Project Gutenberg License" not in text and "\r" not in text


def test_heldout_novels_begin_as_they_should():
    if not (DATA / "heldout" / "emma.txt").is_file():
        pytest.skip("no held-out text: run python scripts/fetch_text.py")
    assert (DATA / "heldout" / "emma.txt").read_text().startswith("EMMA\n\nBy Jane Austen\n")
    assert "It is a truth universally acknowledged" in (DATA / "heldout" / "prideprejudice.txt").read_text()[:400]
    assert (DATA / "calibration.txt").stat().st_size > 5_000_000


def test_default_model_perplexity_rises_with_sparsity(smollm2, heldout_ids):
    model, meta = smollm2
    if not SHIPPED.is_file():
        pytest.skip(f"{SHIPPED.name} not shipped yet")
    table = thresholds.load(SHIPPED, fingerprint=meta["fingerprint"])
    windows = thresholds.token_windows(heldout_ids, 4, 513)
    ppl = [r["ppl"] for r in thresholds.perplexity(model, windows, [table.at(s) for s in (0, 0.25, 0.5)], scored=256)]
    assert ppl[0] < ppl[1] < ppl[2], ppl
    assert 10 < ppl[0] < 100, ppl  # sane dense perplexity on prose


def test_eval_ppl_script_end_to_end(smollm2_dir, tmp_path):
    if not SHIPPED.is_file():
        pytest.skip(f"{SHIPPED.name} not shipped yet")
    if not (DATA / "heldout" / "persuasion.txt").is_file():
        pytest.skip("no held-out text: run python scripts/fetch_text.py")
    out = tmp_path / "ppl.json"
    done = run_script("-m", "scripts.eval_ppl", "--text", str(DATA / "heldout" / "persuasion.txt"), "--sparsities", "0,0.5",
                      "--windows", "2", "--window-length", "192", "--scored", "64", "--out", str(out),
                      "--checkpoint", str(smollm2_dir))
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    assert [r["sparsity"] for r in doc["results"]] == [0, 0.5] and doc["tokens_scored"] == 128
    assert doc["results"][0]["ppl"] < doc["results"][1]["ppl"]
    assert abs(doc["results"][1]["measured"] - 0.5) < 0.05
    assert "vs dense" in done.stdout
    # --method greedy is the default: greedy rows where the file has them, uniform otherwise.
    assert doc["method"] == ("greedy" if thresholds.load(SHIPPED).greedy is not None else "uniform")


def test_eval_ppl_defaults_fit_a_short_context_model(tmp_path, capsys):
    """A model of 128 positions: windows of 128, the last quarter scored, with no flag for it."""
    from scripts import eval_ppl

    ckpt = tiny_checkpoint(tmp_path)
    eval_ppl.main(["--checkpoint", str(ckpt), "--text", str(REPO / "README.md"), "--windows", "2", "--sparsities", "0,0.5",
                   "--device", "cpu", "--out", str(tmp_path / "ppl.json")])
    doc = json.loads((tmp_path / "ppl.json").read_text())
    assert (doc["window_length"], doc["scored"], doc["tokens_scored"]) == (128, 32, 64)
