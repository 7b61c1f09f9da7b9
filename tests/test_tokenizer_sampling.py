"""Tokenizers (byte, SentencePiece and HF tokenizer.json trained here on text shipped with Python)
and sampling (greedy, temperature, top-k, top-p, seeds, stop conditions)."""

import pytest
import torch

from colm.generate import generate
from colm.sampling import SamplingParams, filtered_probs, sample_next
from colm.tokenizer import ByteTokenizer, load_tokenizer, tokenizer_from_files
from tests.conftest import make_model


def corpus() -> str:
    from pydoc_data.topics import topics

    return "\n".join(list(topics.values())[:40])


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    text = "chains: ξ(x, n) — naïve ✓"
    ids = tok.encode(text, add_bos=True)
    assert ids[0] == tok.bos_id and max(ids[1:]) < 256
    assert tok.decode(ids) == text
    assert load_tokenizer({"kind": "byte"}).encode("a") == [97]
    with pytest.raises(ValueError, match="tokenizer kind 'gpt'"):
        load_tokenizer({"kind": "gpt"})


def test_sentencepiece_and_hf_json_from_local_files(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("tokenizers")
    text_file = tmp_path / "corpus.txt"
    text_file.write_text(corpus())
    spm.SentencePieceTrainer.train(input=str(text_file), model_prefix=str(tmp_path / "tokenizer"), vocab_size=300,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    sp = tokenizer_from_files(tmp_path)
    sample = "The import statement binds names."
    assert sp.vocab_size == 300 and sp.decode(sp.encode(sample)) == sample
    assert sp.encode(sample, add_bos=True)[0] == 1 and sp.eos_id == 2

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train([str(text_file)], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = tokenizer_from_files(tmp_path)  # tokenizer.json wins over tokenizer.model
    assert tok.spec()["kind"] == "hf" and tok.bos_id == 1 and tok.eos_id == 2
    assert tok.decode(tok.encode(sample)) == sample
    with pytest.raises(ValueError, match="not found"):
        load_tokenizer({"kind": "hf", "file": "nope.json"}, tmp_path)
    # the router's length check: a text that cannot fit is refused from its first pieces, never tokenized whole;
    # one that fits (however long: whitespace a normalizer drops) gets exactly encode_prompt's ids
    from colm.tokenizer import encode_prompt, encode_prompt_within

    long_text = (corpus() * 3)[:60000]
    for t in (ByteTokenizer(), sp, tok):
        seen = []
        enc = t.encode
        t.encode = lambda text, add_bos=False, enc=enc: seen.append(len(text)) or enc(text, add_bos)
        with pytest.raises(ValueError, match=r"prompt \(60000 characters\) exceeds the context of 1024 tokens"):
            encode_prompt_within(t, long_text, 1024)
        assert len(seen) == 1 and seen[0] == 8192  # one piece counted, then refused
        del t.encode
        assert len(t.encode(long_text)) > 1024
        for text in (long_text[:5000], " " * 50000, "\n" * 40000):
            if len(encode_prompt(t, text)) <= 1024:
                assert encode_prompt_within(t, text, 1024) == encode_prompt(t, text)
    assert encode_prompt_within(sp, " " * 50000, 1024) == encode_prompt(sp, " " * 50000)  # SentencePiece drops them


@pytest.mark.parametrize("merges", [True, False])
def test_a_byte_level_hf_tokenizer_gives_each_tokens_own_bytes(tmp_path, merges):
    """Byte-level BPE (GPT-2, Llama 3): ``decode_bytes`` of each token are its exact bytes, a piece of a UTF-8
    character included (what OpenAI's log-prob ``bytes`` carry); joined they are the text's UTF-8; added tokens
    (EOS) give none, as ``decode`` leaves them out."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from colm.tokenizer import HFTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400 if merges else 257, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus(), "héllo wörld ☃ naïve café\n\tx" * 20], trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    h = HFTokenizer(str(tmp_path / "tokenizer.json"))
    text = "naïve ☃ café\n\t{x}"
    ids = h.encode(text)
    pieces = [h.decode_bytes([i]) for i in ids]
    assert b"".join(pieces) == h.decode_bytes(ids) == text.encode("utf-8") and h.decode(ids) == text
    if not merges:  # one byte a token: the snowman's three bytes are three tokens
        assert pieces == [bytes([b]) for b in text.encode("utf-8")]
    assert h.decode_bytes([h.eos_id]) == b""


def test_sampling_params_validation():
    for kw, needle in [({"temperature": -1}, "temperature=-1"), ({"top_p": 0}, "top_p=0"),
                       ({"top_k": -2}, "top_k=-2"), ({"max_new_tokens": -1}, "max_new_tokens=-1"),
                       ({"stop_strings": ("",)}, "stop_strings")]:
        with pytest.raises(ValueError, match=needle):
            SamplingParams(**kw)


def test_filters_and_seeded_sampling():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    p = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (p[2:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    full = torch.softmax(logits, -1)
    p = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    # smallest prefix with mass >= 0.8: the top two tokens hold 0.245+0.665 = 0.91
    assert full[0] < 0.8 < full[0] + full[1]
    assert (p[2:] == 0).all() and p[0] > p[1] > 0
    params = SamplingParams(temperature=0.9, seed=123)
    a = [sample_next(logits, params, g) for g in [params.make_generator()] for _ in range(20)]
    b = [sample_next(logits, params, g) for g in [params.make_generator()] for _ in range(20)]
    assert a == b and len(set(a)) > 1
    assert sample_next(logits, SamplingParams(), None) == 0


def _reference_filter(logits, t, min_p, top_k, top_p):
    """The filters by their definitions, in float64 over a full sort (vLLM's order; ties at a threshold kept
    together)."""
    s = logits.double() / t
    if min_p:
        p = torch.softmax(s, -1)
        s = s.masked_fill(p < min_p * p.max(), float("-inf"))
    if top_k:
        s = s.masked_fill(s < torch.sort(s, descending=True).values[top_k - 1], float("-inf"))
    p = torch.softmax(s, -1)
    if top_p >= 1:
        return p
    sp = torch.sort(p, descending=True).values
    last = sp[int(((torch.cumsum(sp, -1) - sp) < top_p).sum()) - 1]  # the last of the smallest prefix reaching top_p
    out = p.masked_fill(p < last, 0.0)
    return out / out.sum()


@pytest.mark.parametrize("spread,bf16", [(0.3, False), (4.0, False), (2.0, True)])
def test_the_filters_equal_their_definitions(spread, bf16):
    """temperature, min_p, top_k and top_p (top-p found without sorting the vocabulary) keep the same tokens with
    the same probabilities as a float64 full-sort reference, for random logits over 5000 tokens: flat (the nucleus
    spans thousands of tokens), peaked (a few), and rounded to bf16 (ties everywhere, kept or dropped together)."""
    g = torch.Generator().manual_seed(int(spread * 10) + bf16)
    for t in (0.5, 1.3):
        for min_p, top_k, top_p in ((0, 0, 0.9), (0, 0, 0.999), (0, 7, 0.5), (0, 300, 0.95), (0.01, 0, 0.8),
                                    (0.2, 40, 1.0), (0, 0, 1.0)):
            logits = torch.randn(5000, generator=g) * spread
            if bf16:
                logits = logits.bfloat16().float()
                assert len(logits.unique()) < 2000  # ties indeed: 5000 logits, fewer distinct values
            got = filtered_probs(logits, SamplingParams(temperature=t, min_p=min_p, top_k=top_k, top_p=top_p))
            want = _reference_filter(logits, t, min_p, top_k, top_p)
            assert torch.equal(got > 0, want > 0), (t, min_p, top_k, top_p)
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)


def test_draws_follow_their_distribution():
    from colm.sampling import draw

    probs = torch.tensor([0.5, 0.25, 0.125, 0.0, 0.125])
    g = torch.Generator().manual_seed(5)
    counts = torch.bincount(torch.tensor([draw(probs * 3, g) for _ in range(20000)]), minlength=5).double() / 20000
    assert counts[3] == 0
    torch.testing.assert_close(counts, probs.double(), atol=0.015, rtol=0)  # ~4 standard errors at n = 20000


def test_a_batch_samples_each_row_as_it_would_alone():
    """sample_rows over 16 rows of mixed filters (one top-k of 3000 widens the batch's sorted prefix for all) gives
    each row the token it gets alone with the same seed; a NaN row raises and moves no generator."""
    from colm.sampling import sample_rows

    g = torch.Generator().manual_seed(8)
    logits = torch.randn(16, 5000, generator=g) * torch.tensor([0.3, 3.0]).repeat(8)[:, None]
    kinds = [dict(), dict(top_p=0.9), dict(top_k=5), dict(top_k=3000, top_p=0.5), dict(min_p=0.05),
             dict(min_p=0.01, top_p=0.95), dict(top_k=40, top_p=0.8), dict(top_p=0.999)]
    params = [SamplingParams(temperature=[0.7, 1.2][i % 2], seed=i, **kinds[i % 8]) for i in range(16)]
    batch = sample_rows(logits, params, [p.make_generator() for p in params])
    alone = [sample_rows(logits[i:i + 1], [p], [p.make_generator()])[0] for i, p in enumerate(params)]
    assert batch == alone and len(set(batch)) > 8
    ties = logits.bfloat16()  # a GPU step's logits: many equal values
    assert sample_rows(ties, params, [p.make_generator() for p in params]) == [
        sample_rows(ties[i:i + 1], [p], [p.make_generator()])[0] for i, p in enumerate(params)]
    gens = [p.make_generator() for p in params]
    bad = logits.clone()
    bad[5] = float("nan")
    with pytest.raises(ValueError, match="sampling row 5"):
        sample_rows(bad, params, gens)
    assert sample_rows(logits, params, gens) == batch


def test_generate_stops_and_validates():
    model = make_model("tiny-air", seed=18)
    prompt = [5, 6, 7, 8]
    free = generate(model, prompt, SamplingParams(max_new_tokens=10), scale=2).token_ids
    stop_tok = free[3]
    first = free.index(stop_tok)
    res = generate(model, prompt, SamplingParams(max_new_tokens=10, stop_token_ids=(stop_tok,)), scale=2)
    assert res.token_ids == free[: first + 1] and res.finish_reason == "stop"
    res = generate(model, prompt, SamplingParams(max_new_tokens=10), scale=2, eos_id=stop_tok)
    assert res.finish_reason == "stop"
    res = generate(model, prompt, SamplingParams(max_new_tokens=10, ignore_eos=True), scale=2, eos_id=stop_tok)
    assert res.token_ids == free and res.finish_reason == "length"
    res = generate(model, prompt, SamplingParams(max_new_tokens=6), scale_schedule=lambda i: 1 if i < 3 else 2)
    assert res.scales == [1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        generate(model, [], SamplingParams())
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        generate(model, [1] * 500, SamplingParams(max_new_tokens=20))
