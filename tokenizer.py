"""The tokenizer of a checkpoint directory: byte-level BPE through tiktoken, or sentencepiece.

A checkpoint directory holds tokenizer_config.json and one model file:
  tokenizer.tiktoken  byte-level BPE, one "base64(token bytes) rank" line per token, rank = token id
  tokenizer.model     a sentencepiece model (Llama-2, Mistral)
tokenizer_config.json:
  version         1
  kind            "tiktoken" | "sentencepiece"
  pattern         the pre-tokenizer regex (tiktoken only, else null)
  special_tokens  {text: id}; found in text by encode(), never split by BPE
  bos_id          id or null;  add_bos: whether the model was trained with bos before plain text
  eos_ids         ids that end generation, the tokenizer's own eos first
  chat_template   jinja2 source (Hugging Face's convention) or null
"""
import base64
import json
import math
import os
import re

from checkpoint import atomic_write, atomic_write_text

TOKENIZER_CONFIG = "tokenizer_config.json"
TIKTOKEN_FILE = "tokenizer.tiktoken"
SENTENCEPIECE_FILE = "tokenizer.model"
VERSION = 1

# Pre-tokenizer regexes in tiktoken's dialect.
PATTERNS = {
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    # SmolLM2/StarCoder run a splitter that isolates every digit, then GPT-2's regex on the stretches
    # between digits: a whitespace run before a digit ends its stretch, hence \s+(?=\p{N}).
    "smollm": r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+""",
    "llama3": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}


class TokenizerError(Exception):
    pass


class Tokenizer:
    """What both kinds share: special tokens, bos/eos and the chat template."""

    def __init__(self, config):
        self.special_tokens = dict(config["special_tokens"])
        self.bos_id = config["bos_id"]
        self.eos_ids = set(config["eos_ids"])
        self.add_bos = bool(config["add_bos"])
        self.chat_template = config["chat_template"]
        special_text = {i: t for t, i in self.special_tokens.items()}
        # Templates spell these out (Llama-2's "{{ bos_token }}[INST]"); encode() turns them back into ids.
        self.bos_token = special_text.get(self.bos_id, "")
        self.eos_token = special_text.get(config["eos_ids"][0], "") if config["eos_ids"] else ""
        names = sorted(self.special_tokens, key=len, reverse=True)  # longest first: a special may prefix another
        self.special_split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def split_special(self, text):
        """-> [(special id or None, text)]: the special tokens found in text, and the text between them."""
        if self.special_split is None:
            return [(None, text)]
        parts = self.special_split.split(text)
        return [(self.special_tokens[p] if i % 2 else None, p) for i, p in enumerate(parts) if p]

    def encode(self, text, bos=False):
        ids = self.encode_text(text)
        return [self.bos_id] + ids if bos and self.bos_id is not None else ids

    def encode_chat(self, messages):
        """The chat prompt's ids: the template's text with its special tokens, each message's content
        as plain text, so that a special token typed in a message is text, not control. Templates
        write their own BOS."""
        markers = [f"\ue000{i}\ue001" for i in range(len(messages))]  # private-use code points
        rendered = self.render_chat([dict(m, content=mark) for m, mark in zip(messages, markers)])
        ids = []
        for message, mark in zip(messages, markers):
            template, sep, rendered = rendered.partition(mark)
            if not sep:
                raise TokenizerError("the chat template does not write each message's content once")
            ids += self.encode_text(template) + self.encode_plain(message["content"])
        return ids + self.encode_text(rendered)

    def render_chat(self, messages):
        """messages: [{"role": ..., "content": ...}] -> the prompt text, ending where the assistant speaks."""
        if not self.chat_template:
            raise TokenizerError("this checkpoint's tokenizer has no chat template")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # The environment Hugging Face renders chat templates in, so templates written for it work.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise_template_error
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=True, bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from None


def _raise_template_error(message):
    raise TokenizerError(f"chat template: {message}")


class TiktokenTokenizer(Tokenizer):
    def __init__(self, path, config):
        import regex
        import tiktoken

        super().__init__(config)
        self.ranks = read_tiktoken_ranks(path)
        self.encoding = tiktoken.Encoding("checkpoint", pat_str=config["pattern"], mergeable_ranks=self.ranks,
                                          special_tokens=self.special_tokens)
        # Byte-level vocabularies may lack some single bytes (SmolLM2 lacks 21, control characters
        # among them), and tiktoken panics on those. Text holding one takes the slow path below.
        self.missing_bytes = bytes(b for b in range(256) if bytes([b]) not in self.ranks)
        self.pattern = regex.compile(config["pattern"])

    def encode_text(self, text):
        if self.has_all_bytes(text):
            return self.encoding.encode(text, allowed_special="all")
        # Hugging Face's BPE drops a byte it has no token for before merging its neighbours, so
        # split as tiktoken would (specials, then the pattern) and run BPE on each piece here.
        ids = []
        for special, part in self.split_special(text):
            ids += [special] if special is not None else self.encode_pieces(part)
        return ids

    def encode_plain(self, text):
        """text's ids with special tokens' spellings taken as text."""
        if self.has_all_bytes(text):
            return self.encoding.encode(text, allowed_special=set(), disallowed_special=())
        return self.encode_pieces(text)

    def has_all_bytes(self, text):
        """Whether every byte of text has a token (tiktoken panics on one that has none)."""
        data = text.encode("utf-8", "replace")
        return len(data.translate(None, self.missing_bytes)) == len(data)

    def encode_pieces(self, text):
        """The slow path: the pattern's pieces, each by BPE with the missing bytes dropped."""
        return [i for piece in self.pattern.findall(text) for i in self.bpe(piece.encode("utf-8", "replace").translate(None, self.missing_bytes))]

    def bpe(self, piece):
        """tiktoken's byte-pair merge of one piece: merge the adjacent pair making the lowest rank."""
        if piece in self.ranks:
            return [self.ranks[piece]]
        parts = [piece[i:i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            rank, i = min((self.ranks.get(a + b, math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
            if rank == math.inf:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [self.ranks[p] for p in parts]

    def decode(self, ids):
        return self.encoding.decode(ids)


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path, config):
        import sentencepiece

        super().__init__(config)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=path)

    def encode_text(self, text):
        # sentencepiece never parses "<s>" in text: encode the stretches between special tokens.
        ids = []
        for special, part in self.split_special(text):
            ids.extend([special] if special is not None else self.sp.encode(part))
        return ids

    def encode_plain(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode(list(ids))


def load_tokenizer(checkpoint_dir):
    path = os.path.join(checkpoint_dir, TOKENIZER_CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise TokenizerError(f"no tokenizer in {checkpoint_dir}: {TOKENIZER_CONFIG} is missing") from None
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(config, dict) or config.get("version") != VERSION:
        raise TokenizerError(f"{path} is not a version {VERSION} tokenizer config")
    kinds = {"tiktoken": (TiktokenTokenizer, TIKTOKEN_FILE), "sentencepiece": (SentencePieceTokenizer, SENTENCEPIECE_FILE)}
    if config.get("kind") not in kinds:
        raise TokenizerError(f"{path}: unknown tokenizer kind {config.get('kind')!r}")
    cls, file = kinds[config["kind"]]
    model_path = os.path.join(checkpoint_dir, file)
    if not os.path.isfile(model_path):
        raise TokenizerError(f"no tokenizer in {checkpoint_dir}: {file} is missing")
    try:
        return cls(model_path, config)
    except TokenizerError:
        raise
    except Exception as e:  # a corrupt file surfaces as whatever its parser raises
        raise TokenizerError(f"cannot load the tokenizer in {checkpoint_dir} ({type(e).__name__}: {e})") from None


def read_tiktoken_ranks(path):
    with open(path, "rb") as f:
        return {base64.b64decode(token, validate=True): int(rank) for token, rank in (line.split() for line in f if line.strip())}


# Writing a tokenizer, for the converters.

def save_tokenizer(out_dir, kind, *, special_tokens, bos_id, eos_ids, add_bos, chat_template, pattern=None,
                   ranks=None, sentencepiece_model=None):
    """Write the model file (ranks: {bytes: id}, or sentencepiece_model: the .model bytes), then the config."""
    if kind == "tiktoken":
        lines = "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in sorted(ranks.items(), key=lambda x: x[1]))
        atomic_write_text(os.path.join(out_dir, TIKTOKEN_FILE), lines)
    else:
        atomic_write(os.path.join(out_dir, SENTENCEPIECE_FILE), lambda tmp: tmp.write_bytes(sentencepiece_model))
    config = dict(version=VERSION, kind=kind, pattern=pattern, special_tokens=special_tokens, bos_id=bos_id,
                  eos_ids=list(eos_ids), add_bos=add_bos, chat_template=chat_template)
    atomic_write_text(os.path.join(out_dir, TOKENIZER_CONFIG), json.dumps(config, indent=1, ensure_ascii=False))


def _byte_level_alphabet():
    """GPT-2's map from printable characters back to bytes: byte-level vocabularies spell tokens in it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_BYTE_OF_CHAR = _byte_level_alphabet()


def byte_level_ranks(vocab, skip_ids=()):
    """vocab: {byte-level token: id} -> {token bytes: id} for tiktoken, leaving out skip_ids (the specials)."""
    try:
        return {bytes(_BYTE_OF_CHAR[c] for c in token): i for token, i in vocab.items() if i not in skip_ids}
    except KeyError as e:
        raise TokenizerError(f"token spelled with {e.args[0]!r}, which is outside the byte-level alphabet") from None


def check_merge_order(vocab, merges):
    """tiktoken merges the pair whose result has the lowest rank; Hugging Face's BPE applies merges in
    list order. They agree when each merge's result has a higher id than the previous merge's."""
    last = -1
    for a, b in merges:
        rank = vocab.get(a + b)
        if rank is None or rank <= last:
            raise TokenizerError(f"merge {a!r} + {b!r} is out of id order, so tiktoken cannot reproduce this BPE")
        last = rank
