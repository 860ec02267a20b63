"""What the scripts share beyond generate.py's command-line helpers (UsageError, cli, load_model,
find_table): the repository's data and results folders, text cut into token windows, and results
files written atomically with the environment that produced them."""
import json
import platform
import sys
from pathlib import Path

import torch

import thresholds
from checkpoint import atomic_write, atomic_write_text
from generate import UsageError

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
RESULTS = REPO / "benchmarks" / "results"
FETCH = "run python scripts/fetch_text.py"


def text_files(paths, default):
    """--text: the files given, else those of default (a file, or a folder's *.txt); each must exist."""
    paths = paths or ([default] if default.suffix else sorted(default.glob("*.txt")))
    if not paths:
        raise UsageError(f"no text in {default} ({FETCH})")
    for path in paths:
        if not Path(path).is_file():
            raise UsageError(f"text not found: {path} ({FETCH})")
    return [Path(p) for p in paths]


def text_windows(tokenizer, paths, n, length):
    """-> (token ids, [n, length] windows spread over them): each file is one document, a bos (if
    the model uses one) at its start."""
    ids = [i for path in paths for i in tokenizer.encode(Path(path).read_text(encoding="utf-8"), bos=tokenizer.add_bos)]
    try:
        return ids, thresholds.token_windows(ids, n, length)
    except ValueError as e:
        raise UsageError(str(e)) from None


def scored_windows(window_length, scored, block_size):
    """(C, E) of the perplexity protocol: windows of C tokens (capped at the model's positions), the
    last E thresholded and scored; E by default 512, or a quarter of C where C is shorter than 2048."""
    C = min(window_length, block_size)
    E = scored or min(512, C // 4)
    if not 0 < E < C:
        raise UsageError(f"--scored {E} must be between 1 and the window length {C} - 1")
    return C, E


def shown(path):
    """A path as a results file records it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def environment(device, script, argv=None):
    """What produced a result: the command (python -m scripts.<script> and argv, by default this
    process's arguments), the device, and the versions of what ran it."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = str(device)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({torch.backends.cpu.get_cpu_capability()})"
    return dict(command=" ".join([f"python -m scripts.{script}", *(sys.argv[1:] if argv is None else argv)]),
                device=device, device_name=name, torch=torch.__version__, triton=triton_version, python=platform.python_version())


def gpu_tag(device):
    """A GPU's short name for results files: "NVIDIA H200" -> h200."""
    return torch.cuda.get_device_name(device).lower().removeprefix("nvidia ").split()[0]


def save_json(path, doc):
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def save_figure(path, fig):
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip(".")))
    plt.close(fig)
