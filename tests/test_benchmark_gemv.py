"""benchmark_gemv's option syntax (configs, shapes) and its refusals, which run without a GPU."""
import os
import subprocess
import sys

import pytest

from generate import UsageError
from scripts.benchmark_gemv import parse_args, parse_config, parse_shape
from sparse_kernels.configs import Config
from tests.helpers import REPO


def test_config_syntax():
    cfg = parse_config("128x64r1024w4c")
    assert (cfg.block_n, cfg.block_k, cfg.rows_per_program, cfg.num_warps, cfg.compact) == (128, 64, 1024, 4, True)
    assert parse_config("1024x16r512w8").compact is False
    assert parse_config("1024x16r512w8").blocks_per_program == 1
    assert parse_config("512x16r1024w4cb2") == Config(512, 16, 1024, 4, True, 2)
    with pytest.raises(UsageError, match="at least one block"):
        parse_config("512x16r1024w4cb0")
    with pytest.raises(UsageError, match="multiple of BLOCK_K"):
        parse_config("128x64r100w4")
    with pytest.raises(UsageError, match="is not BLOCK_N"):
        parse_config("128x64w4")


def test_shape_syntax():
    assert parse_shape("4096:14336,14336") == (4096, (14336, 14336))
    assert parse_shape("14336:4096") == (14336, (4096,))
    with pytest.raises(UsageError, match="--shape expects"):
        parse_shape("4096x14336")


def test_shape_and_configs_go_together():
    with pytest.raises(UsageError, match="go together"):
        parse_args(["--configs", "128x64r1024w4"])
    assert parse_args(["--shape", "8:8", "--configs", "16x16r16w4"]).configs == ["16x16r16w4"]


@pytest.mark.parametrize("argv, message", [(["--shape", "8:8", "--configs", "oops"], "error: config 'oops'"),
                                           ([], "error: this benchmark times kernels on a CUDA GPU")])
def test_bad_input_is_one_error_line(tmp_path, argv, message):
    out = tmp_path / "g.json"
    done = subprocess.run([sys.executable, "-m", "scripts.benchmark_gemv", *argv, "--out", str(out)], cwd=REPO,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().startswith(message) and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()
