"""Generate text with TEAL activation sparsity: `python generate.py --sparsity 0.5 --prompt "..."`."""
import argparse
import math
import sys
import time

import torch

import checkpoint
import thresholds
import tp
from checkpoint import CheckpointError
from model import PROJECTIONS
from sparse_kernels import check_decode_layers
from thresholds import model_wide
from tokenizer import TokenizerError, load_tokenizer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class UsageError(Exception):
    """Bad input on the command line: one `error:` line and exit code 1 (cli)."""


def multinomial_sample_one_no_sync(probs):
    # Exponential race instead of torch.multinomial: sampling without a CUDA synchronization.
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1, keepdim=True)


def sample(logits, temperature, top_k):
    """logits: (B, T, vocab) -> (B, 1) the next token after the last position.

    temperature: a 0-d fp32 tensor on logits' device, 0 for greedy: a tensor, so that one compiled
    step serves every temperature (a float would be a constant of the graph, and a change of it a
    recompile); both draws are made and the temperature picks one. top_k: int, 0 or None for all."""
    logits = logits[:, -1]  # (B, vocab)
    greedy = torch.argmax(logits, dim=-1, keepdim=True)
    scaled = logits.float() / temperature.clamp(min=1e-6)
    if top_k:
        v, _ = torch.topk(scaled, min(top_k, scaled.size(-1)))
        scaled = torch.where(scaled < v[:, -1:], -float("inf"), scaled)
    sampled = multinomial_sample_one_no_sync(torch.softmax(scaled, dim=-1))
    return torch.where(temperature > 0, sampled, greedy).to(torch.int)


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

    temperature: a float or a 0-d tensor (0: greedy); callback(token) sees each new token and
    returns True to stop (an end-of-sequence token)."""
    T = prompt.numel()
    device = prompt.device
    temperature = torch.as_tensor(temperature, dtype=torch.float32, device=device)
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
    model, meta = tp.load(ckpt, device=device, dtype=dtype)  # under torchrun, this rank's shard
    return model, meta, load_tokenizer(ckpt.parent), ckpt


def find_table(meta, ckpt, path=None, config=None):
    """-> (Thresholds, its path): the file given, else the one that goes with the checkpoint."""
    path = path or thresholds.find_thresholds(ckpt.parent, checkpoint.lineage(meta))
    if path is None:
        raise UsageError(f"no thresholds file for {meta.get('name', ckpt)} (make one with python -m scripts.calibrate, or pass --thresholds)")
    return thresholds.load(path, fingerprint=checkpoint.lineage(meta), config=config), path


def load_thresholds(model, meta, ckpt, path, sparsity, method):
    """Fill the model's threshold buffers for a model-wide sparsity -> (file used, method used), or
    (None, None) for a dense run with no --thresholds (none needed). A file given is read and checked
    at sparsity 0 too."""
    if sparsity == 0 and path is None:
        return None, None
    table, path = find_table(meta, ckpt, path, model.config)
    used = table.serves(method)
    if sparsity > table.top(method):
        hint = f"; --method uniform reaches {table.top('uniform'):g}" if used == "greedy" else ""
        raise UsageError(f"--sparsity {sparsity:g} is above the {used} thresholds' range, [0, {table.top(method):g}]{hint}")
    model.set_thresholds(table.at(sparsity, method=method))
    return path, used


def bytes_per_token(model, sparsity):
    """Bytes a decode step reads: each projection's weight times its kept fraction (and all of its
    int8/int4 scales and zeros), plus lm_head. Norms, one embedding row and the KV cache are left
    out (under 1% at a few hundred tokens)."""
    head = model.packed_head()
    weights = [model.output.weight] if head is None else [t for t in head.kernel_tensors()[:3] if t is not None]
    total = sum(t.numel() * t.element_size() for t in weights)
    for layer, row in zip(model.layers, sparsity):
        for proj, cols in layer.projections():
            data, scales, zeros, _ = proj.weight.kernel_tensors()
            share = torch.tensor(proj.weight.splits, dtype=torch.float64) / proj.weight.out_features
            kept = float(((1 - row[cols].double()) * share).sum())
            total += data.numel() * data.element_size() * kept
            total += sum(t.numel() * t.element_size() for t in (scales, zeros) if t is not None)
    return total


def parse_args(argv=None):
    args = arg_parser().parse_args(argv)
    if not 0 <= args.sparsity < 1:
        raise UsageError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise UsageError("--max-new-tokens and --num-samples must be at least 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature must be a number >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be 0 (all tokens) or more, got {args.top_k}")
    return args


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows a flag's default where it has one and its help does not say it already."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in action.help:
            return action.help
        return super()._get_help_string(action)


def arg_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", help=f"checkpoint dir or model.safetensors (default: the bundled {checkpoint.BUNDLED})")
    p.add_argument("--prompt", default="The three most useful things to know about the Python language are", help="the text to continue")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the checkpoint's chat template")
    p.add_argument("--interactive", action="store_true", help="chat from the terminal (uses the chat template)")
    p.add_argument("--compare", action="store_true", help="decode the prompt densely first, then as asked: the two answers and speeds")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
    p.add_argument("--num-samples", type=int, default=1, help="times to generate from --prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy decoding")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest tokens; 0 for all")
    p.add_argument("--sparsity", type=float, default=0.0,
                   help="model-wide activation sparsity target; 0 is dense. The thresholds file sets the top: "
                        "about 0.9 with greedy rows, 0.95 uniform")
    p.add_argument("--thresholds", help="thresholds file (default: the one that goes with the checkpoint)")
    p.add_argument("--method", choices=thresholds.METHODS, default="greedy",
                   help="per-projection sparsities (greedy, when the file has them) or one for all (uniform)")
    p.add_argument("--dense", action="store_true", help="decode with plain matmuls (the baseline)")
    p.add_argument("--sparse-prefill", action="store_true", help="threshold the prompt's projections too (TEAL keeps prefill dense)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="weights and activations (default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--persistent", action="store_true",
                   help="experimental: run each sparse decode step's layers as one persistent kernel (where it can run; else it says why)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (on CUDA: one CUDA graph a step; on the CPU the dense step only, since "
                        "compiled the sparse one is slower there: README, Benchmarks, CPU); compiling takes a while, once")
    p.add_argument("--seed", type=int, default=1234, help="random seed for sampling")
    return p


def main(argv=None):
    tp.quiet()  # under torchrun, rank 0 alone prints
    args = parse_args(argv)
    device = tp.init(resolve_device(args.device))  # under torchrun: this rank's device
    torch.manual_seed(args.seed)  # the same on every rank, so every rank samples the same tokens

    t0 = time.perf_counter()
    model, meta, tokenizer, ckpt = load_model(args.checkpoint, device, DTYPES[dtype_name(args.dtype, device)])
    used, method = load_thresholds(model, meta, ckpt, args.thresholds, args.sparsity, args.method)
    sparse = not args.dense and args.sparsity > 0
    print(f"Loaded {meta.get('name', ckpt)} in {time.perf_counter() - t0:.1f} s; "
          + (f"thresholds for sparsity {args.sparsity:g} ({method}) from {used}" if sparse else "dense"), file=sys.stderr)

    if args.interactive:
        cache_len = min(model.config.block_size, 4096)  # room for a conversation, allocated once
    else:
        ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else tokenizer.encode(args.prompt, bos=tokenizer.add_bos)
        if not ids:
            raise UsageError("--prompt is empty, and this model starts no text with a BOS token: give it some text")
        cache_len = len(ids) + args.max_new_tokens
        if cache_len > model.config.block_size:
            raise UsageError(f"a prompt of {len(ids)} tokens plus {args.max_new_tokens} new tokens exceeds the model's {model.config.block_size}-token context")
    model.setup_caches(1, cache_len, persistent=args.persistent)
    run = Run(model, tokenizer, args, device)

    if args.compile:
        t0 = time.perf_counter()
        # Compiled, the CPU's sparse step is slower than eager (its custom op's wrapper costs more
        # than the kernel saves: README, Benchmarks, CPU), so there --compile leaves it eager.
        if sparse and not device.startswith("cuda"):
            print("--compile: on the CPU the sparse decode step stays eager (compiled it is slower)", file=sys.stderr)
        else:
            run.compile(sparse)
        if args.compare:
            run.compile(False)
        if run.steps:
            print(f"Compiled the decode step in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.interactive:
        return chat(run, sparse, cache_len, read=tp.read_line)  # under torchrun, rank 0 reads
    for i in range(args.num_samples):
        if args.compare:
            run.reply(ids, False, f"dense, sample {i + 1}" if args.num_samples > 1 else "dense", echo=not args.chat)
        label = f"sample {i + 1}" if args.num_samples > 1 else None
        if args.compare:
            label = f"{'sparse ' + format(args.sparsity, 'g') if sparse else 'dense'}" + (f", {label}" if label else "")
        run.reply(ids, sparse, label, echo=not args.chat)


class Run:
    """A loaded model's decode loop with the command line's settings: the (compiled) steps, and
    one reply at a time, streamed, with its speed and measured sparsity."""

    def __init__(self, model, tokenizer, args, device):
        self.model, self.tokenizer, self.args, self.device = model, tokenizer, args, device
        self.steps = {}  # sparse -> the compiled decode step
        self.last_text = ""

    def compile(self, sparse):
        """Compile (and record the CUDA graph of) the step once, with the run's own sampling
        settings, so that no compile or recording lands in a timed reply."""
        self.steps[sparse] = compile_decode()
        self.model.record_sparsity(sparse)  # the counting flag is part of the compiled graph
        generate(self.model, torch.zeros(4, dtype=torch.int, device=self.device), 8, self.steps[sparse], sparse,
                 self.args.temperature, self.args.top_k)

    def reply(self, ids, sparse, label=None, echo=False):
        """Generate after ids, streaming the text (after the prompt's, with echo) -> the reply's text."""
        a = self.args
        streamed = Streamer(self.tokenizer, ids if echo else [])
        self.model.record_sparsity(sparse)
        prompt = torch.tensor(ids, dtype=torch.int, device=self.device)
        sync(self.device)
        t0 = time.perf_counter()
        try:
            out = generate(self.model, prompt, a.max_new_tokens, self.steps.get(sparse, decode_one_token), sparse,
                           a.temperature, a.top_k, streamed, a.sparse_prefill and sparse)
            n_new = out.numel() - len(ids)
            if self.model.persistent:
                check_decode_layers()  # a wait that gave up is an error, not a wrong reply
        finally:
            sync(self.device)
            elapsed = time.perf_counter() - t0
            self.last_text = streamed.finish()  # what was shown, kept also when Ctrl-C stops the reply
        self.report(label, n_new, elapsed, sparse)
        return self.last_text

    def report(self, label, n_new, elapsed, sparse):
        model = self.model
        if not sparse:
            measured = "measured sparsity 0.000 (dense)"
        elif int(model.recorded_tokens) == 0:
            measured = "no decode step, so no sparsity measured (prefill is dense)"
        else:
            s = model.measured_sparsity()
            per_proj = " ".join(f"{name} {v:.2f}" for name, v in zip(PROJECTIONS, s.mean(0).tolist()))
            measured = (f"measured sparsity {model_wide(s, model.projection_sizes()):.3f} ({per_proj}); "
                        f"{bytes_per_token(model, s) * n_new / elapsed / 1e9:.1f} GB/s")
        print(f"\n[{label + ': ' if label else ''}{n_new} tokens in {elapsed:.2f} s: {n_new / elapsed:.1f} tok/s; {measured}]",
              file=sys.stderr)


def chat(run, sparse, cache_len, read=input):
    """The terminal chat: each turn re-reads the conversation (a dense prefill), forgetting the
    oldest exchanges when it outgrows the cache. /quit or Ctrl-D ends it; Ctrl-C stops a reply.
    read(prompt) -> the user's next line (input, or what a test feeds)."""
    tokenizer, history = run.tokenizer, []
    print("Chat: type a message and press Enter. /quit or Ctrl-D ends the chat; Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            message = read("\nYou: ")
        except EOFError:
            print(file=sys.stderr)
            return
        if message.strip() == "/quit":
            return
        if not message.strip():
            continue
        history.append({"role": "user", "content": message})
        ids = tokenizer.encode_chat(history)
        while len(ids) + run.args.max_new_tokens > cache_len and len(history) > 1:
            history = history[2:]  # forget the oldest exchange rather than overflow the cache
            ids = tokenizer.encode_chat(history)
        if len(ids) + run.args.max_new_tokens > cache_len:
            print(f"error: that message is longer than the {cache_len}-token context allows", file=sys.stderr)
            history = []
            continue
        try:
            history.append({"role": "assistant", "content": run.reply(ids, sparse)})
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)
            history.append({"role": "assistant", "content": run.last_text})


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Streamer:
    """Prints text as tokens arrive, after the prompt's own text when given (gpt-fast's raw mode
    echoes it); decodes the whole text each time so multi-byte characters print whole. Ends at an
    end-of-sequence token, or any other special token: those are control, never text."""

    def __init__(self, tokenizer, prompt_ids=()):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""
        self.stops = tokenizer.eos_ids | set(tokenizer.special_tokens.values())
        self.echo = [i for i in prompt_ids if i not in self.stops]
        if self.echo:
            self.printed = tokenizer.decode(self.echo)
            print(self.printed, end="", flush=True)

    def __call__(self, token):
        token = int(token.view(-1)[0])
        if token in self.stops:
            return True
        self.ids.append(token)
        text = self.tokenizer.decode(self.echo + self.ids)
        if not text.endswith("\ufffd"):
            print(text[len(self.printed):], end="", flush=True)
            self.printed = text
        return False

    def finish(self):
        """Print what is left -> the reply's text (the prompt's left out)."""
        text = self.tokenizer.decode(self.echo + self.ids)
        print(text[len(self.printed):], flush=True)
        return self.tokenizer.decode(self.ids)


ERRORS = (UsageError, CheckpointError, TokenizerError, thresholds.ThresholdsError, tp.PlacementError)


def cli(main, argv=None, errors=()):
    """Run main(argv) as a command: a known error (ERRORS, or errors) ends in one `error:` line and
    exit code 1, Ctrl-C in one line and exit code 130; what main finished is its own to keep.
    Under torchrun each rank ends through tp.end."""
    code = 0
    try:
        main(argv)
    except ERRORS + tuple(errors) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except (KeyboardInterrupt, EOFError):
        print("\ninterrupted", file=sys.stderr)
        code = 130
    tp.end(code)


if __name__ == "__main__":
    cli(main)
