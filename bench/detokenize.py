"""Streaming detokenization cost per request: a full decode per token vs ``IncrementalDetokenizer``.

The router turns every streamed token into text and checks stop strings. Decoding the whole output
again for each token costs O(n) per token; the incremental detokenizer decodes a window of a few
tokens. For outputs of 256 / 1024 / 4096 tokens (real text from ``pydoc_data``) this times both, per
request and per token, with the byte-level tokenizer and a SentencePiece BPE trained here (CPU).
Prints a table and writes JSON.

    python bench/detokenize.py [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time

from colm.detokenize import REPLACEMENT, IncrementalDetokenizer
from colm.tokenizer import ByteTokenizer, tokenizer_from_files

LENGTHS = (256, 1024, 4096)


def corpus() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics.values())


def sentencepiece(tmp: str, text: str):
    import sentencepiece as spm

    with open(os.path.join(tmp, "corpus.txt"), "w") as f:
        f.write(text[:2_000_000])
    spm.SentencePieceTrainer.train(input=os.path.join(tmp, "corpus.txt"), model_prefix=os.path.join(tmp, "tokenizer"),
                                   vocab_size=4000, model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2,
                                   unk_id=0, minloglevel=2)
    return tokenizer_from_files(tmp)


def full_rule(tok, ids, stops):
    """What the router did before: decode everything at every token."""
    sent = ""
    for i in range(len(ids)):
        full = tok.decode(ids[: i + 1])
        visible = full[:-1] if full.endswith(REPLACEMENT) else full
        sent = visible if visible.startswith(sent) else sent
        any(s in full for s in stops)
    return sent


def incremental(tok, ids, stops):
    d = IncrementalDetokenizer(tok.decode, stops)
    for t in ids:
        d.stop_hit(d.add(t))
    d.finish()
    return d.text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    text = corpus()
    stops = ("<|never|>", "\n\n\n\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, tok in (("byte", ByteTokenizer()), ("sentencepiece-bpe-4000", sentencepiece(tmp, text))):
            ids = tok.encode(text[100_000:200_000])
            for n in LENGTHS:
                out = ids[:n]
                times = {}
                for label, fn in (("full_decode", full_rule), ("incremental", incremental)):
                    t0 = time.perf_counter()
                    result = fn(tok, out, stops)
                    times[label] = time.perf_counter() - t0
                    if label == "incremental":
                        assert result == tok.decode(out)
                row = {"tokenizer": name, "output_tokens": n,
                       "full_decode_ms": times["full_decode"] * 1e3, "incremental_ms": times["incremental"] * 1e3,
                       "full_us_per_token": times["full_decode"] / n * 1e6,
                       "incremental_us_per_token": times["incremental"] / n * 1e6,
                       "speedup": times["full_decode"] / times["incremental"]}
                rows.append(row)
                print(f"{name:24s} {n:5d} tokens: full {row['full_decode_ms']:9.1f} ms ({row['full_us_per_token']:7.1f} "
                      f"us/token) | incremental {row['incremental_ms']:7.1f} ms ({row['incremental_us_per_token']:5.1f} "
                      f"us/token) | {row['speedup']:6.1f}x", flush=True)
    res = {"benchmark": "detokenize", "device": f"cpu ({platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} cores)", "python": platform.python_version(),
           "date": datetime.date.today().isoformat(), "stop_strings": list(stops), "rows": rows}
    path = args.out or os.path.join("bench", "results", f"detokenize_cpu_{res['date']}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
