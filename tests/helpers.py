"""Helpers shared by the test files: tiny random models and the repo's data paths. Fixtures for
the bundled model live in conftest.py."""
import importlib
from pathlib import Path

import pytest
import torch

from model import ModelArgs, Transformer

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
SHIPPED = REPO / "thresholds" / "files" / "smollm2-135m-instruct.json"


def random_model(name="tiny", seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.from_name(name))
    for p in model.projections():
        torch.nn.init.normal_(p.weight.data, std=p.weight.in_features ** -0.5)
    return model.eval()


def random_llama(config, dtype, mode=None, group_size=None, cache_len=64, device=None, seed=0):
    """A random model of config (norm weights ~ N(1, 0.1), embeddings N(0, 1), projections N(0,
    1 / in)), drawn in fp32 on the CPU and loaded in dtype on device, its projections quantized to
    mode (int8, int4) where given, caches for one sequence of cache_len tokens."""
    from quantize import quantize_model

    torch.manual_seed(seed)
    src = Transformer(config)
    with torch.no_grad():
        for name, p in src.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 1.0)
        for proj in src.projections():
            proj.weight.data.normal_(0, proj.weight.in_features ** -0.5)
    model = Transformer(config, dtype=dtype, device=device).load_weights(src.canonical_weights())
    if mode:
        quantize_model(model, mode, group_size)
    model.setup_caches(1, cache_len)
    return model.eval()


def random_windows(model, n, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, length), generator=g)


def interpreted(module, kernel):
    """Body of a module-scoped fixture: TRITON_INTERPRET=1 while the test module runs, so CPU tensors
    go through sparse_kernels.<module>'s Triton kernel; yields the module, or skips where triton
    was built for a GPU."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        mod = importlib.import_module(f"sparse_kernels.{module}")
        if type(getattr(mod, kernel)).__name__ != "InterpretedFunction":
            pytest.skip("triton was imported for a GPU (CUDA present): the interpreter tests need a CPU-only process")
        yield mod


CHAT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def tiny_checkpoint(ckpt):
    """A tiny random checkpoint in directory ckpt (128 positions), with a byte-level tokenizer
    (token id = byte) and a uniform thresholds file calibrated on random tokens."""
    import thresholds
    from checkpoint import save
    from tokenizer import PATTERNS, save_tokenizer

    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1.0 if "norm" in name or "embeddings" in name else 0.1)
        for proj in model.projections():
            proj.weight.data.normal_(0, proj.weight.in_features ** -0.5)
    meta = save(ckpt / "model.safetensors", model.canonical_weights(), model.config, "tiny-test")
    save_tokenizer(ckpt, "tiktoken", special_tokens={}, bos_id=None, eos_ids=[], add_bos=False, chat_template=CHAT,
                   pattern=PATTERNS["gpt2"], ranks={bytes([i]): i for i in range(256)})
    table = thresholds.calibrate(model, torch.randint(0, 256, (8, 64)), skip=8, refine=False)
    table.name, table.fingerprint = "tiny-test", meta["fingerprint"]
    table.save(ckpt / "thresholds.json")
    return ckpt
