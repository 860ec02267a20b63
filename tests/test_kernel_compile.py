"""Every kernel variant compiles for sm_90 with Triton's compiler, on the CPU: the interpreter runs
a kernel's Python, so a type a branch changes, or a construct the compiler refuses, passes every
interpreter test and fails at the first GPU launch. tests/compile_kernels.py compiles them in a
process without TRITON_INTERPRET."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

VARIANTS = [f"gemv-{fmt}-{form}-{loop}" for fmt in ("bf16", "fp32", "int8", "int4")
            for form in ("plain", "qkv", "norm_count", "swiglu_residual", "rows")
            for loop in ("masked", "compact") if not (form == "rows" and loop == "compact")] + ["attention-bf16", "attention-fp32"]
VARIANTS += [f"persistent-{fmt}{count}" for fmt in ("bf16", "fp32", "int8", "int4") for count in ("", "-count")]
VARIANTS += [f"gemv-{fmt}-norm_count-{loop}-blocks2" for fmt in ("bf16", "fp32", "int8", "int4") for loop in ("masked", "compact")]


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(REPO / "tests" / "compile_kernels.py")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def test_every_variant_is_built(compiled):
    assert sorted(compiled) == sorted(VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiles_for_sm90(compiled, variant):
    assert compiled[variant] is None, compiled[variant]
