"""Generate text with TEAL activation sparsity: `python generate.py --sparsity 0.5 --prompt "..."`."""
import argparse
import sys
import time

import torch

import checkpoint
import thresholds
from checkpoint import CheckpointError
from model import PROJECTIONS
from thresholds import model_wide
from tokenizer import TokenizerError, load_tokenizer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class UsageError(Exception):
    """Bad input on the command line: one `error:` line and exit code 1 (cli)."""


def multinomial_sample_one_no_sync(probs):
    # Exponential race instead of torch.multinomial: sampling without a CUDA synchronization.
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1, keepdim=True).to(torch.int)


def sample(logits, temperature, top_k):
    logits = logits[:, -1]  # (B, vocab)
    if temperature <= 0:
        return torch.argmax(logits, dim=-1, keepdim=True).to(torch.int)
    logits = logits.float() / temperature
    if top_k:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = torch.where(logits < v[:, -1:], -float("inf"), logits)
    return multinomial_sample_one_no_sync(torch.softmax(logits, dim=-1))


def prefill(model, x, input_pos, sparse, temperature, top_k):
    # x: (B, T) prompt; TEAL keeps it dense: prefill is compute-bound, skipping rows buys little.
    return sample(model(x, input_pos, sparse=sparse), temperature, top_k)


def decode_one_token(model, x, input_pos, sparse, temperature, top_k):
    # x: (B, 1); the unit torch.compile captures as one CUDA graph.
    return sample(model(x, input_pos, sparse=sparse), temperature, top_k)


def decode_n_tokens(decode, model, cur_token, input_pos, n, sparse, temperature, top_k, callback=None):
    tokens = []
    for _ in range(n):
        next_token = decode(model, cur_token, input_pos, sparse, temperature, top_k).clone()
        input_pos += 1
        tokens.append(next_token)
        cur_token = next_token
        if callback is not None and callback(next_token):
            break
    return tokens


@torch.no_grad()
def generate(model, prompt, max_new_tokens, decode=decode_one_token, sparse=True, temperature=0.0, top_k=None, callback=None,
             sparse_prefill=False):
    """prompt: (T,) token ids -> (T + new,) ids; the cache must hold T + max_new_tokens.

    callback(token) sees each new token and returns True to stop (an end-of-sequence token)."""
    T = prompt.numel()
    device = prompt.device
    input_pos = torch.arange(T, device=device)
    first = prefill(model, prompt.view(1, -1), input_pos, sparse_prefill, temperature, top_k)
    if callback is not None and callback(first):
        return torch.cat([prompt, first.view(-1)])
    input_pos = torch.tensor([T], device=device)
    tokens = decode_n_tokens(decode, model, first, input_pos, max_new_tokens - 1, sparse, temperature, top_k, callback=callback)
    return torch.cat([prompt, first.view(-1), *[t.view(-1) for t in tokens]])


def compile_decode():
    """The decode step as one CUDA graph (torch.compile, reduce-overhead, no graph breaks)."""
    # gpt-fast's inductor settings: coordinate-descent tuning is what lets inductor's own GEMV
    # reductions (lm_head, the dense baseline's projections) reach full memory bandwidth.
    torch._inductor.config.coordinate_descent_tuning = True
    torch._inductor.config.triton.unique_kernel_names = True
    torch._inductor.config.fx_graph_cache = True
    return torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)


def resolve_device(name):
    """--device: cpu or cuda[:N], and a GPU there when cuda is asked for."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device (cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: this code runs on cpu or cuda only")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for, but no CUDA GPU is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return name


def dtype_name(name, device):
    """--dtype's name (a key of DTYPES), by default bf16 on CUDA and fp32 on the CPU."""
    return name or ("bf16" if device.startswith("cuda") else "fp32")


def load_model(path, device, dtype):
    """-> (model, checkpoint metadata, tokenizer, model.safetensors path); path None: the bundled model."""
    ckpt = checkpoint.resolve(path)
    model, meta = checkpoint.load(ckpt, device=device, dtype=dtype)
    return model, meta, load_tokenizer(ckpt.parent), ckpt


def find_table(meta, ckpt, path=None, config=None):
    """-> (Thresholds, its path): the file given, else the one that goes with the checkpoint."""
    path = path or thresholds.find_thresholds(ckpt.parent, checkpoint.lineage(meta))
    if path is None:
        raise UsageError(f"no thresholds file for {meta.get('name', ckpt)} (make one with python -m scripts.calibrate, or pass --thresholds)")
    return thresholds.load(path, fingerprint=checkpoint.lineage(meta), config=config), path


def load_thresholds(model, meta, ckpt, path, sparsity, method):
    """Fill the model's threshold buffers for a model-wide sparsity; returns the file used."""
    if sparsity == 0:
        return None
    table, path = find_table(meta, ckpt, path, model.config)
    model.set_thresholds(table.at(sparsity, method=method))
    return path


def bytes_per_token(model, sparsity):
    """Bytes a decode step reads: each projection's weight times its kept fraction, plus lm_head.
    Norms, one embedding row and the KV cache are left out (under 1% at a few hundred tokens)."""
    total = model.output.weight.numel() * model.output.weight.element_size()
    for layer, row in zip(model.layers, sparsity):
        for proj, cols in layer.projections():
            data = proj.weight.data
            share = torch.tensor(proj.weight.splits, dtype=torch.float64) / proj.weight.out_features
            kept = float(((1 - row[cols].double()) * share).sum())
            total += data.numel() * data.element_size() * kept
    return total


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", help=f"checkpoint dir or model.safetensors (default: the bundled {checkpoint.BUNDLED})")
    p.add_argument("--prompt", default="The three most useful things to know about the Python language are")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the checkpoint's chat template")
    p.add_argument("--interactive", action="store_true", help="chat from the terminal (uses the chat template)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--sparsity", type=float, default=0.0, help="model-wide activation sparsity target in [0, 1)")
    p.add_argument("--thresholds", help="thresholds file (default: the one that goes with the checkpoint)")
    p.add_argument("--method", choices=("greedy", "uniform"), default="greedy", help="per-projection sparsities (greedy, when the file has them) or one for all")
    p.add_argument("--dense", action="store_true", help="decode with plain matmuls (the baseline)")
    p.add_argument("--sparse-prefill", action="store_true", help="threshold the prompt's projections too (TEAL keeps prefill dense)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step into a CUDA graph")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    if not 0 <= args.sparsity < 1:
        raise UsageError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise UsageError("--max-new-tokens and --num-samples must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    model, meta, tokenizer, ckpt = load_model(args.checkpoint, device, DTYPES[dtype_name(args.dtype, device)])
    used = load_thresholds(model, meta, ckpt, args.thresholds, args.sparsity, args.method)
    print(f"Loaded {meta.get('name', ckpt)} in {time.perf_counter() - t0:.1f} s"
          + (f"; thresholds for sparsity {args.sparsity} ({args.method}) from {used}" if used else "; dense"), file=sys.stderr)

    sparse = not args.dense and args.sparsity > 0
    if args.interactive:
        cache_len = min(model.config.block_size, 4096)  # room for a conversation, allocated once
        prompts = iter(lambda: input("\nYou: "), None)
    else:
        ids = encode_chat(tokenizer, [{"role": "user", "content": args.prompt}]) if args.chat else tokenizer.encode(args.prompt, bos=tokenizer.add_bos)
        cache_len = len(ids) + args.max_new_tokens
        prompts = [ids] * args.num_samples
    if cache_len > model.config.block_size:
        raise UsageError(f"a prompt of {cache_len - args.max_new_tokens} tokens plus {args.max_new_tokens} new tokens exceeds the model's {model.config.block_size}-token context")
    model.setup_caches(1, cache_len)
    model.record_sparsity(sparse)  # before compiling: the flag is part of the compiled graph

    decode = decode_one_token
    if args.compile:
        decode = compile_decode()
        t0 = time.perf_counter()
        # Compiles, then records the CUDA graph: both happen on the first calls, not in the timing.
        generate(model, torch.zeros(4, dtype=torch.int, device=device), 8, decode, sparse)
        print(f"Compiled the decode step in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    history = []
    for i, ids in enumerate(prompts):
        if args.interactive:
            history.append({"role": "user", "content": ids})
            ids = encode_chat(tokenizer, history)
            while len(ids) + args.max_new_tokens > cache_len and len(history) > 1:
                history = history[2:]  # forget the oldest exchange rather than overflow the cache
                ids = encode_chat(tokenizer, history)
            if len(ids) + args.max_new_tokens > cache_len:
                print(f"error: that message is longer than the {cache_len}-token context allows", file=sys.stderr)
                history = []
                continue
        prompt = torch.tensor(ids, dtype=torch.int, device=device)
        streamed = Streamer(tokenizer)
        model.record_sparsity(sparse)
        sync(device)
        t0 = time.perf_counter()
        out = generate(model, prompt, args.max_new_tokens, decode, sparse, args.temperature, args.top_k, streamed, args.sparse_prefill and sparse)
        sync(device)
        elapsed = time.perf_counter() - t0
        reply = streamed.finish()
        if args.interactive:
            history.append({"role": "assistant", "content": reply})
        n_new = out.numel() - len(ids)
        measured = model.measured_sparsity() if sparse else torch.zeros(model.config.n_layer, len(PROJECTIONS))
        per_proj = " ".join(f"{name} {s:.2f}" for name, s in zip(PROJECTIONS, measured.mean(0).tolist()))
        print(f"\n[sample {i + 1}] {n_new} tokens in {elapsed:.2f} s: {n_new / elapsed:.1f} tok/s; "
              f"measured sparsity {model_wide(measured, model.projection_sizes()):.3f} ({per_proj}); "
              f"{bytes_per_token(model, measured) * n_new / elapsed / 1e9:.1f} GB/s", file=sys.stderr)


def encode_chat(tokenizer, messages):
    # Chat templates write their own BOS.
    return tokenizer.encode(tokenizer.render_chat(messages), bos=False)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Streamer:
    """Prints text as tokens arrive; decodes the whole reply each time so multi-byte characters print whole."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def __call__(self, token):
        token = int(token.view(-1)[0])
        if token in self.tokenizer.eos_ids:
            return True
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            print(text[len(self.printed):], end="", flush=True)
            self.printed = text
        return False

    def finish(self):
        text = self.tokenizer.decode(self.ids)
        print(text[len(self.printed):], flush=True)
        return text


ERRORS = (UsageError, CheckpointError, TokenizerError, thresholds.ThresholdsError)


def cli(main, argv=None, errors=()):
    """Run main(argv) as a command: a known error (ERRORS, or errors) ends in one `error:` line and
    exit code 1, Ctrl-C in one line and exit code 130; what main finished is its own to keep."""
    try:
        main(argv)
    except ERRORS + tuple(errors) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, EOFError):
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli(main)
