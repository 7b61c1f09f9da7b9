"""What picking a token costs per decode step, by how the batch's requests sample (CPU or GPU).

The decode engine picks plain greedy rows on the device (one [2, B] read per step); sampled rows are drawn where the
logits are; rows with penalties / bias / allowed ids / min_tokens / structured output are adjusted together where
the logits are (only the entries of the context's tokens; a grammar's bitmask filled on the host) and picked there;
rows reporting top log-probs take one ``topk`` (``decode_worker.step._picks``). This times
``_picks`` alone on a step head of B rows of random logits over a V-token vocabulary, every row of the batch in
one mode, after the request has produced ``--context`` tokens (penalty counts and grammar state are warm):

* ``greedy``: device argmax (the baseline every ratio is against);
* ``sampled``: temperature 0.8, top-p 0.95; ``min_p``: temperature 0.8, min-p 0.05;
* ``sampled_fullsort``: the same draws as colm sampled before its top-p search (a sort of the whole vocabulary per
  row and ``torch.multinomial``), after one copy of the rows to the host, kept here as a baseline of ``sampled``;
* ``sampled_rowwise``: the current sampler one row at a time on the host after one copy (the engine before it
  sampled its rows together where the logits are), the other baseline;
* ``penalized``: greedy with repetition 1.1, frequency 0.5 and presence 0.5 penalties; ``penalized_host``: the same
  picked as the engine did before it adjusted rows together on the device (one copy of the rows to the host, then
  row by row over dense vocabulary-sized counts), the baseline;
* ``top_logprobs``: greedy reporting the 5 most likely tokens;
* ``structured``: greedy held to JSON objects, one per line and never ending (``json_object``'s grammar under a
  repetition, so that no request completes while it is timed), over a synthetic byte-level vocabulary of V tokens
  (the 256 bytes, then random 2-8 byte strings of printable ASCII, as a BPE vocabulary's tokens look);
* ``structured_host``: ``structured`` picked on the host row by row (xgrammar applying each row's bitmask in place),
  the baseline; ``structured_penalized``: both.

The whole decode step's time at the same batch comes from ``bench/decode_profile.py`` (GPU) or the engine; this
bench is the picking's share only. Prints a table and writes JSON (``bench/results/``).

    python bench/sampling_overhead.py [--device cuda] [--vocab 128256] [--batches 1,8,64] [--context 256]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import statistics
import time

import torch

from _results import write_result  # bench/ is sys.path[0] when a bench runs as a script

MODES = ("greedy", "sampled_fullsort", "sampled_rowwise", "sampled", "min_p", "penalized_host", "penalized",
         "top_logprobs", "structured_host", "structured", "structured_penalized")


class SyntheticTokenizer:
    """A byte-level vocabulary of ``vocab_size`` tokens for the grammar engine: the 256 bytes, EOS, then random
    printable strings (seeded)."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        rng = random.Random(seed)
        self.eos_id = 256
        words = {bytes([i]) for i in range(256)}
        extra = []
        while len(extra) < vocab_size - 257:
            w = bytes(rng.randint(32, 126) for _ in range(rng.randint(2, 8)))
            if w not in words:
                words.add(w)
                extra.append(w)
        self.vocab = [bytes([i]) for i in range(256)] + [b""] + extra

    def token_bytes(self, vocab_size: int) -> list[bytes]:
        return self.vocab[:vocab_size] + [b""] * (vocab_size - len(self.vocab))


def json_lines() -> str:
    """EBNF: JSON objects (``json_object``'s rules), each followed by a newline, any number of them."""
    from colm.structured import _json_schema_ebnf

    return _json_schema_ebnf('{"type": "object"}').replace("root ::=", "obj ::=", 1) + '\nroot ::= (obj "\\n")*\n'


def params_for(mode: str, max_new: int):
    from colm.sampling import SamplingParams
    from colm.structured import StructuredOutput

    mode = mode.removesuffix("_host")
    lines = StructuredOutput("grammar", json_lines()) if mode.startswith("structured") else None
    pen = dict(repetition_penalty=1.1, frequency_penalty=0.5, presence_penalty=0.5)
    return {"greedy": SamplingParams(max_new_tokens=max_new),
            "sampled": SamplingParams(max_new_tokens=max_new, temperature=0.8, top_p=0.95, seed=1),
            "min_p": SamplingParams(max_new_tokens=max_new, temperature=0.8, min_p=0.05, seed=1),
            "penalized": SamplingParams(max_new_tokens=max_new, **pen),
            "top_logprobs": SamplingParams(max_new_tokens=max_new, top_logprobs=5),
            "structured": SamplingParams(max_new_tokens=max_new, structured=lines),
            "structured_penalized": SamplingParams(max_new_tokens=max_new, structured=lines, **pen)}[mode]


def fullsort_sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    """Top-p sampling by a sort of the whole vocabulary and torch.multinomial (colm's sampler before its top-p
    search): the baseline of the ``sampled`` mode."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, idx = torch.sort(probs, descending=True)
    sorted_p = sorted_p.masked_fill(torch.cumsum(sorted_p, -1) - sorted_p >= top_p, 0.0)
    probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def fullsort_picks(head, rows) -> list[tuple]:
    return [(fullsort_sample(x, 0.8, 0.95, r.generator), 0.0) for x, r in zip(head.logits.cpu(), rows)]


def host_adjusted_picks(head, rows) -> list[tuple]:
    """Adjusted rows as the engine picked them before it adjusted them together where the logits are: one copy of
    the rows to the host, then per row the grammar's mask (xgrammar applying its bitmask in place) and the
    penalties over dense vocabulary-sized counts, and the argmax: the baseline of ``penalized`` / ``structured``."""
    out = []
    for x, r in zip(head.logits.cpu(), rows):
        a, p = r.adjust, r.params
        a.fold(r.out_tokens)
        x = x.float().clone()
        if a.matcher is not None:
            a.matcher.mask(x)
        seen, ids, counts = a.context()
        if p.repetition_penalty != 1:
            hit = x[seen]
            x[seen] = torch.where(hit > 0, hit / p.repetition_penalty, hit * p.repetition_penalty)
        dense = torch.zeros_like(x)
        dense[torch.from_numpy(ids)] = torch.from_numpy(counts)
        if p.frequency_penalty:
            x -= p.frequency_penalty * dense
        if p.presence_penalty:
            x -= p.presence_penalty * (dense > 0).float()
        out.append((int(x.argmax()), 0.0))
    return out


def rowwise_picks(head, rows) -> list[tuple]:
    from colm.sampling import sample_next

    return [(sample_next(x, r.params, r.generator), 0.0) for x, r in zip(head.logits.cpu(), rows)]


class Row:
    """The fields of a DecodeRequest that ``_picks`` reads."""

    def __init__(self, params, adjust, generator) -> None:
        self.params, self.adjust, self.generator, self.out_tokens = params, adjust, generator, []


def time_mode(mode: str, batch: int, vocab: int, context: int, device: str, tok, reps: int) -> dict:
    from colm.decode_worker.step import _picks
    from colm.kernels.greedy_head import greedy_head
    from colm.decode_worker.graphs import StepHead
    from colm.logits_adjust import make_adjuster

    g = torch.Generator(device=device).manual_seed(0)
    params = params_for("sampled" if mode.startswith("sampled_") else mode, context + reps + 16)
    pick = {"sampled_fullsort": fullsort_picks, "sampled_rowwise": rowwise_picks, "penalized_host": host_adjusted_picks,
            "structured_host": host_adjusted_picks}.get(mode, _picks)
    prompt = torch.randint(0, 256, (64,)).tolist()
    rows = [Row(params, make_adjuster(params, vocab, prompt, tok.eos_id, tokenizer=tok), params.make_generator())
            for _ in range(batch)]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    times = []
    for it in range(context + reps):
        logits = torch.randn(batch, vocab, generator=g, device=device).to(dtype) * 4
        logits[:, tok.eos_id] = -1e4  # the output never ends (an ended grammar takes no more tokens)
        head = StepHead(logits, *greedy_head(logits))
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        picks = pick(head, rows)
        dt = time.perf_counter() - t0  # _picks reads its results on the host: the device work is included
        for r, (t, *_rest) in zip(rows, picks):
            r.out_tokens.append(t)
        if it >= context:
            times.append(dt * 1e3)
    return {"mode": mode, "batch": batch, "ms_median": statistics.median(times),
            "ms_p90": sorted(times)[int(0.9 * (len(times) - 1))], "reps": reps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--context", type=int, default=256, help="tokens produced before timing (warm state)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = SyntheticTokenizer(args.vocab)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or "cpu")
    res = {"benchmark": "sampling_overhead", "device": dev, "torch": torch.__version__,
           "python": platform.python_version(), "date": datetime.date.today().isoformat(),
           "threads": torch.get_num_threads(), "vocab": args.vocab, "context": args.context, "results": []}
    try:
        import xgrammar

        res["xgrammar"] = getattr(xgrammar, "__version__", "installed")
    except ImportError:
        pass
    print(f"{'batch':>5} {'mode':<22} {'ms/step':>9} {'p90':>8} {'x greedy':>9}")
    for b in (int(x) for x in args.batches.split(",")):
        base = None
        for mode in args.modes.split(","):
            try:
                r = time_mode(mode, b, args.vocab, args.context, args.device, tok, args.reps)
            except ValueError as e:  # structured output without xgrammar on this machine
                print(f"{b:>5} {mode:<22} skipped: {e}")
                res["results"].append({"mode": mode, "batch": b, "skipped": str(e)})
                continue
            base = r["ms_median"] if mode == "greedy" else base
            r["ratio_to_greedy"] = r["ms_median"] / base if base else None
            res["results"].append(r)
            ratio = f"{r['ratio_to_greedy']:.1f}" if r["ratio_to_greedy"] else "-"
            print(f"{b:>5} {mode:<22} {r['ms_median']:>9.3f} {r['ms_p90']:>8.3f} {ratio:>9}")
    write_result(res, "sampling_overhead", dev, res["date"], args.out, device="cpu" if args.device == "cpu" else None)


if __name__ == "__main__":
    main()
