"""Tokenizers. SmolLM2's tiktoken encoding is checked against a `tokenizers` pipeline built the way
the original SmolLM2 tokenizer is (Digits(individual_digits) then ByteLevel, BPE over the GGUF's
vocabulary and merges, no unk token): transformers' GGUF-built tokenizer is not a reference, it
differs from the original on whitespace before digits."""
import argparse
import json
import random

import pytest

from tokenizer import TokenizerError, load_tokenizer, save_tokenizer


PROSE = """The 3 ships left port on 12 March 1851, at   7:45 in the morning; by the 20th only 2 remained.
Captain O'Neill's log reads:\t"Wind 15-20 knots, heading 270°, 4,500 leagues to go."  She'd said they'll
be back by 1852 -- they weren't.   Numbers like 3.14159, 1e-5, 0x1F and 2^10=1024 sit beside words.
    An indented line with  double  spaces, a trailing one \nand a blank line follow.

 7 dwarfs, 101 dalmatians, 1001 nights;  42.  Tabs\tbefore\t9 and newlines before
8 and spaces before    6, all split the way the original splits them. Prices: $5.99, €12,50, ¥300.
Café, naïve, résumé, Ångström, Straße; Москва 2024; 東京は1位。 Emoji 🙂 x3.\r\nWindows line end.
"""


def prose():
    """A few thousand characters: the passage above and some of Python's own documentation."""
    return PROSE + "\n\n".join(m.__doc__ for m in (json, argparse, random))


@pytest.fixture(scope="module")
def reference(bundled_gguf):
    gguf = pytest.importorskip("gguf")
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, models, pre_tokenizers

    reader = gguf.GGUFReader(bundled_gguf)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ")) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    ref = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    ref.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens[:17]])
    return ref


def test_smollm2_encodes_like_the_original(smollm2_dir, reference):
    tok, text = load_tokenizer(smollm2_dir), prose()
    assert len(text) > 3000
    for line in text.splitlines(keepends=True):  # line by line first, to name the line that differs
        assert tok.encode(line) == reference.encode(line).ids, line
    ids = tok.encode(text)
    assert ids == reference.encode(text).ids
    assert tok.decode(ids) == text


def test_smollm2_control_bytes_do_not_crash(smollm2_dir, reference):
    # 21 single bytes have no token (\x04, \x06, ... and bytes of code points from U+40000 on);
    # the original drops such a byte before merging its neighbours.
    tok = load_tokenizer(smollm2_dir)
    texts = ["".join(map(chr, range(256))), "a \x04b", "/\x06?", "x \U00050000 y", "1\x1d2  \x00 3", "\x04"]
    for text in texts:
        assert tok.encode(text) == reference.encode(text).ids, repr(text)


def test_smollm2_specials_and_chat(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, {2}, False)
    prompt = tok.render_chat([{"role": "user", "content": "Hi 2"}])
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                      "<|im_start|>user\nHi 2<|im_end|>\n<|im_start|>assistant\n")
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert tok.encode("hi", bos=True) == [1, 6004]


def test_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    model = tmp_path / "sp.model"
    lines = [line for line in prose().splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines * 3), model_prefix=str(tmp_path / "sp"), vocab_size=600,
                                   model_type="bpe", byte_fallback=True, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)  # as Llama's
    sp = spm.SentencePieceProcessor(model_file=str(model))
    save_tokenizer(tmp_path, "sentencepiece", special_tokens={"<unk>": 0, "<s>": 1, "</s>": 2}, bos_id=1, eos_ids=[2],
                   add_bos=True, chat_template="{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}",
                   sentencepiece_model=model.read_bytes())
    tok = load_tokenizer(tmp_path)
    text = prose()
    assert tok.encode(text, bos=True) == [1] + sp.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(tok.render_chat([{"role": "user", "content": "hi"}])) == [1] + sp.encode("[INST] hi [/INST]")


def test_missing_or_corrupt_tokenizer(tmp_path, smollm2_dir):
    def error(directory):
        with pytest.raises(TokenizerError) as e:
            load_tokenizer(directory)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "missing" in error(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    assert "JSON" in error(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text((smollm2_dir / "tokenizer_config.json").read_text())
    assert "missing" in error(tmp_path)
    (tmp_path / "tokenizer.tiktoken").write_bytes((smollm2_dir / "tokenizer.tiktoken").read_bytes()[:1000] + b"\x00garbage")
    error(tmp_path)
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(config, kind="sentencepiece")))
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    error(tmp_path)
