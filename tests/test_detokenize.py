"""Incremental detokenization (``colm.detokenize``) against full decodes, token by token.

Tokenizers: byte-level, a SentencePiece BPE with byte fallback and an HF byte-level BPE, both trained
here on text shipped with Python (so pieces can end inside a UTF-8 character). Token lists: real text
with accents, CJK and emoji, and random ids (invalid UTF-8 included). At every token the text given out
must equal the full decode less its trailing U+FFFDs (so streamed text only grows), ``finish`` must
complete it to the full decode, and a stop string must be found at the same token as a search of the
full text finds it.
"""

from __future__ import annotations

import random

import pytest

from colm.detokenize import REPLACEMENT, IncrementalDetokenizer
from colm.tokenizer import ByteTokenizer, tokenizer_from_files

EXTRA = " naïve café — ∑x² 日本語のテキスト 😀🚀 "


def corpus() -> str:
    from pydoc_data.topics import topics

    return "\n".join(list(topics.values())[:30]) + EXTRA * 20


def _sequences(tok, vocab: int, rng: random.Random, n: int = 60) -> list[list[int]]:
    text = corpus()
    out = []
    for i in range(n):
        if i % 4 == 0:
            out.append([rng.randrange(vocab) for _ in range(rng.randint(1, 50))])
        else:
            a = rng.randrange(len(text) - 300)
            out.append(tok.encode(text[a:a + rng.randint(20, 300)] + EXTRA))
    return out


def _check(tok, seqs, rng: random.Random) -> None:
    for ids in seqs:
        full_text = tok.decode(ids)
        stops = [full_text[a:a + rng.randint(1, 6)] for a in rng.sample(range(len(full_text)), min(3, len(full_text)))]
        stops = [s for s in stops if s and REPLACEMENT not in s]
        d = IncrementalDetokenizer(tok.decode, stops)
        hit_inc = hit_full = None
        for i, t in enumerate(ids):
            delta = d.add(t)
            full = tok.decode(ids[: i + 1])
            assert d.text == full.rstrip(REPLACEMENT), (ids[: i + 1], d.text, full)
            if hit_inc is None and d.stop_hit(delta):
                hit_inc = i
            if hit_full is None and any(s in full for s in stops):
                hit_full = i
        assert hit_inc == hit_full, (stops, hit_inc, hit_full)
        d.finish()
        assert d.text == full_text


def test_byte_tokenizer():
    rng = random.Random(0)
    tok = ByteTokenizer()
    _check(tok, _sequences(tok, 256, rng), rng)


def test_trained_sentencepiece_with_byte_fallback_and_hf_bytelevel_bpe(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("tokenizers")
    rng = random.Random(1)
    text_file = tmp_path / "corpus.txt"
    text_file.write_text(corpus())
    (tmp_path / "sp").mkdir()
    spm.SentencePieceTrainer.train(input=str(text_file), model_prefix=str(tmp_path / "sp" / "tokenizer"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=0.98,
                                   bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    sp = tokenizer_from_files(tmp_path / "sp")
    _check(sp, _sequences(sp, sp.vocab_size, rng), rng)

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train([str(text_file)], trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"]))
    (tmp_path / "hf").mkdir()
    hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    tok = tokenizer_from_files(tmp_path / "hf")
    _check(tok, _sequences(tok, 500, rng), rng)


def test_stop_hit_looks_only_at_new_text():
    d = IncrementalDetokenizer(ByteTokenizer().decode, ["ab"])
    assert not d.stop_hit(d.add(ord("a")))
    assert d.stop_hit(d.add(ord("b")))  # "ab" completed by this token
    assert not d.stop_hit(d.add(ord("c")))  # "ab" is old text now
    assert not IncrementalDetokenizer(ByteTokenizer().decode).stop_hit("x")  # no stop strings
