"""What the kernels share on a device: its multiprocessor count and one scratch workspace.

Calls on one stream run one after another and each leaves its counters at zero, so one workspace
serves them all. Buffers only grow, and never during CUDA-graph capture (a graph's private pool
refuses them): warm up, or call once at each shape, before capturing."""
import torch

_sm_counts = {}


def sm_count(device):
    """Multiprocessors of a CUDA device; 2 for the CPU, where the Triton interpreter runs programs one
    by one (few, but more than one split, so the split-K paths run in tests)."""
    if device.type != "cuda":
        return 2
    if device not in _sm_counts:
        _sm_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_counts[device]


class Workspace:
    """fp32 partials, int32 arrival counters, and the GEMV's compacted active channels (int32 index,
    fp32 value) of each program, per device. A replaced buffer is kept alive: a captured graph may
    still point at it."""

    KINDS = {"partials": torch.float32, "counters": torch.int32, "index": torch.int32, "value": torch.float32}

    def __init__(self):
        self.buffers = {}
        self.retired = []
        self.generation = 0  # moves whenever a buffer is replaced: launch plans holding buffers check it

    def get(self, device, **sizes):
        """sizes: elements needed per kind -> the buffers, in KINDS order."""
        have = self.buffers.setdefault(device, {})
        for kind, n in sizes.items():
            old = have.get(kind)
            if old is not None and old.numel() >= n:
                continue
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("a sparse kernel needs a larger workspace during CUDA-graph capture: "
                                   "call it once with this shape before capturing (sparse_kernels.warm_up)")
            if old is not None:
                self.retired.append(old)
                n = max(n, 2 * old.numel())
            have[kind] = torch.zeros(max(n, 1 << 12), dtype=self.KINDS[kind], device=device)
            self.generation += 1
        return [have[kind] for kind in self.KINDS if kind in sizes]


workspace = Workspace()
