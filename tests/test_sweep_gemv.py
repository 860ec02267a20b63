"""The GEMV sweep's config and shape syntax, and its refusal without a GPU."""
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.sweep_gemv import parse_config, parse_shape

REPO = Path(__file__).resolve().parents[1]


def test_config_syntax():
    cfg = parse_config("128x64r1024w4c")
    assert (cfg.block_n, cfg.block_k, cfg.rows_per_program, cfg.num_warps, cfg.compact) == (128, 64, 1024, 4, True)
    assert parse_config("1024x16r512w8").compact is False
    with pytest.raises(ValueError, match="multiple of BLOCK_K"):
        parse_config("128x64r100w4")
    with pytest.raises(ValueError, match="is not BLOCK_N"):
        parse_config("128x64w4")


def test_shape_syntax():
    assert parse_shape("4096:14336,14336") == (4096, (14336, 14336))
    assert parse_shape("14336:4096") == (14336, (4096,))


def test_bad_config_is_one_error_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "scripts.sweep_gemv", "--shape", "8:8", "--configs", "oops",
                           "--out", str(tmp_path / "s.json")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().startswith("error: config 'oops'") and "Traceback" not in done.stderr
    assert not (tmp_path / "s.json").exists()
