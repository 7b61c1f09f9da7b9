"""Structured output: a request's output held to a JSON schema, any JSON object, a regular expression, an EBNF
grammar or one of a list of strings, token by token.

The grammar engine is xgrammar (the one vLLM and SGLang use by default): it compiles a schema, regex or grammar
for a tokenizer's vocabulary into a pushdown automaton with precomputed token masks, so compiling is fast and
bounded (unlike a regex-to-DFA index, whose states can grow exponentially with the pattern: a 50-character regex
took 10 s and 800k states that way here) and a step's mask costs about a microsecond for the byte vocabulary.
It is imported only when a request asks for structured output.

* ``StructuredOutput`` is what a request asks for (validated and size-bounded; it travels in ``Sampling``).
* ``compile_output(so, tokenizer, vocab_size)`` compiles it for a tokenizer (one xgrammar compiler per tokenizer,
  which caches compiled grammars); a schema, regex or grammar it cannot compile is a ValueError naming the kind.
  The router compiles each request's once to refuse a bad one at the boundary; the decode worker compiles its own.
* ``OutputMatcher`` follows one request's output and sets every token the grammar does not allow next to -inf
  (EOS, and only EOS, once the output is complete). ``colm.logits_adjust`` applies it with the other adjustments.

JSON schemas compile without free whitespace (``", "`` and ``": "`` separators): a small model given any
whitespace can spend its whole budget on spaces, and vLLM offers the same choice.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")
# The grammar compiles on the router (to refuse a bad spec) and again on the decode worker, in time that grows with
# its size: on a 2-core CPU a 64 KiB regex of alternatives took 2.8 s, a choice of 256 strings of 1 KiB 17 s (the
# request timed out at the worker's Start). These bounds keep a compile under about a second there.
MAX_SPEC_CHARS = 32768
MAX_CHOICES, MAX_CHOICE_CHARS, MAX_CHOICES_TOTAL_CHARS = 256, 1024, 16384
# compiled grammars cached per tokenizer (their memory_size_bytes), least recently used out past this size: a stream of
# distinct specs must not grow a process's memory without bound. The cache is colm's own: xgrammar's bounded cache
# (cache_limit_bytes) kept memory past its limit on eviction (RSS +3.5 MiB per distinct 2,500-alternative regex, past
# 900 MiB after 150 of them, its own count at 95 MiB). With it off and grammars dropped here, RSS stays flat (the
# process holds about three times the count below for those grammars: ~300 MiB from the 30th such regex on).
GRAMMAR_CACHE_BYTES = 32 << 20


@dataclass(frozen=True)
class StructuredOutput:
    """``kind`` one of ``KINDS``; ``spec``: the schema (JSON text), the regex or the EBNF grammar ("" for
    json_object and choice); ``choices``: the strings of a choice."""

    kind: str
    spec: str = ""
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))
        where = f"structured_output ({self.kind})"
        if self.kind not in KINDS:
            raise ValueError(f"structured_output: kind={self.kind!r} is unknown; allowed: {', '.join(KINDS)}")
        if not isinstance(self.spec, str) or len(self.spec) > MAX_SPEC_CHARS:
            raise ValueError(f"{where}: the spec must be a string of at most {MAX_SPEC_CHARS} characters")
        if self.kind in ("json_object", "choice") and self.spec:
            raise ValueError(f"{where} takes no spec")
        if self.kind != "choice" and self.choices:
            raise ValueError(f"{where} takes no choices")
        if self.kind in ("json_schema", "regex", "grammar") and not self.spec:
            raise ValueError(f"{where}: the spec is empty")
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.spec)
            except ValueError as e:
                raise ValueError(f"{where}: the schema is not JSON ({e})") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"{where}: a schema is a JSON object (or true / false)")
        if self.kind == "choice":
            if not 1 <= len(self.choices) <= MAX_CHOICES:
                raise ValueError(f"{where}: give 1..{MAX_CHOICES} strings (got {len(self.choices)})")
            if not all(isinstance(c, str) and 0 < len(c) <= MAX_CHOICE_CHARS for c in self.choices):
                raise ValueError(f"{where}: each choice is a non-empty string of at most {MAX_CHOICE_CHARS} "
                                 "characters")
            total = sum(map(len, self.choices))
            if total > MAX_CHOICES_TOTAL_CHARS:
                raise ValueError(f"{where}: the choices hold {total} characters together; at most "
                                 f"{MAX_CHOICES_TOTAL_CHARS}")


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise ValueError("structured output needs the xgrammar package on this worker (pip install "
                         "'colm[serve]')") from None
    return xgrammar


def _tokenizer_info(tokenizer, vocab_size: int):
    """xgrammar's view of a tokenizer: the bytes of every token id below ``vocab_size`` and its EOS. Ids the
    tokenizer does not have, and special tokens, are empty: the grammar never allows them."""
    xgr = _xgrammar()
    from colm.tokenizer import HFTokenizer

    eos = getattr(tokenizer, "eos_id", None)
    stops = [eos] if eos is not None and 0 <= eos < vocab_size else []
    if hasattr(tokenizer, "token_bytes"):  # the byte tokenizer, and any tokenizer that lists its tokens' bytes
        vocab = list(tokenizer.token_bytes(vocab_size))
        return xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stops)
    if isinstance(tokenizer, HFTokenizer):
        from transformers import PreTrainedTokenizerFast

        return xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tokenizer.tok),
                                                  vocab_size=vocab_size, stop_token_ids=stops)
    raise ValueError(f"structured output: the {type(tokenizer).__name__} has no byte vocabulary for the grammar "
                     "engine (the byte and HF tokenizer.json tokenizers have)")


_compilers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


class _GrammarCache:
    """Compiled grammars by their source, least recently used dropped past ``limit_bytes`` (memory_size_bytes)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.entries: "OrderedDict[tuple, object]" = OrderedDict()
        self.size_bytes = 0

    def get(self, key: tuple):
        with _lock:
            hit = self.entries.get(key)
            if hit is not None:
                self.entries.move_to_end(key)
            return hit

    def put(self, key: tuple, compiled) -> None:
        size = int(getattr(compiled, "memory_size_bytes", 0))
        with _lock:
            if key in self.entries or size > self.limit_bytes:
                return
            self.entries[key] = compiled
            self.size_bytes += size
            while self.size_bytes > self.limit_bytes:
                _, old = self.entries.popitem(last=False)
                self.size_bytes -= int(getattr(old, "memory_size_bytes", 0))


def _compiler(tokenizer, vocab_size: int):
    """(xgrammar's compiler for ``tokenizer`` below ``vocab_size``, with its own cache off; colm's cache of its
    grammars)."""
    with _lock:
        per_size = _compilers.setdefault(tokenizer, {})
        if vocab_size not in per_size:
            per_size[vocab_size] = (_xgrammar().GrammarCompiler(_tokenizer_info(tokenizer, vocab_size), max_threads=1,
                                                                cache_enabled=False),
                                    _GrammarCache(GRAMMAR_CACHE_BYTES))
        return per_size[vocab_size]


def _ebnf_literal(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # EBNF string literals take JSON's escapes


def _reason(e: Exception) -> str:
    """xgrammar's message without its time stamp and source location."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", msg)


# xgrammar writes the characters of a length-bounded JSON string as [^"\\\r\n], which lets control characters
# through (invalid JSON: "\x1b" came out under maxLength here); its unbounded strings exclude them as JSON says.
_LOOSE_CHARS = '[^\\"\\\\\\r\\n]'
_JSON_CHARS = '[^\\0-\\x1f\\"\\\\\\r\\n]'


@functools.lru_cache(maxsize=256)
def _json_schema_ebnf(schema: str) -> str:
    """xgrammar's EBNF of a JSON schema (no free whitespace), its string characters held to what JSON allows.
    Cached: the router's validation compiles a spec its worker thread just compiled, and only a cached text makes
    that second compile a cache hit without converting the schema again on the event loop."""
    ebnf = str(_xgrammar().Grammar.from_json_schema(schema, any_whitespace=False))
    return ebnf.replace(_LOOSE_CHARS, _JSON_CHARS)


def compile_output(so: StructuredOutput, tokenizer, vocab_size: int):
    """``so`` compiled for ``tokenizer`` (xgrammar's CompiledGrammar), from the cache when it was compiled lately;
    ValueError when it does not compile."""
    comp, cache = _compiler(tokenizer, vocab_size)
    key = (so.kind, so.spec, so.choices)
    compiled = cache.get(key)
    if compiled is None:
        compiled = _compile(comp, so)
        cache.put(key, compiled)
    return compiled


def _compile(comp, so: StructuredOutput):
    try:
        if so.kind == "json_schema":
            return comp.compile_grammar(_json_schema_ebnf(so.spec))
        if so.kind == "json_object":  # an object, as OpenAI's json_object promises (the builtin allows arrays too)
            return comp.compile_grammar(_json_schema_ebnf('{"type": "object"}'))
        if so.kind == "regex":
            return comp.compile_regex(so.spec)
        if so.kind == "grammar":
            return comp.compile_grammar(so.spec)
        return comp.compile_grammar("root ::= " + " | ".join(_ebnf_literal(c) for c in so.choices))
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"structured_output ({so.kind}) does not compile: {_reason(e)}") from None


class OutputMatcher:
    """One request's place in its grammar: ``accept`` each token of the output, ``mask`` the logits of the next."""

    def __init__(self, compiled, vocab_size: int) -> None:
        xgr = _xgrammar()
        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # [1, ceil(V / 32)] int32

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(int(token)):
            raise ValueError(f"token {token} does not continue the request's structured output")

    def fill(self):
        """The bitmask of the tokens the grammar allows next: [1, ceil(V / 32)] int32 on the host, bit j of word w
        for token 32 w + j."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        return self.bitmask.numpy()

    def mask(self, logits):
        """logits: [V] float32 on the host, in place: the tokens the grammar does not allow next get -inf."""
        self.fill()
        self._xgr.apply_token_bitmask_inplace(logits, self.bitmask)
        return logits
