"""Tokenizers: byte-level for tiny models; SentencePiece or HF ``tokenizer.json`` from a local path.

All expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``bos_id``,
``eos_id`` and ``spec()`` (what ``config.json`` records so the checkpoint reloads the same one). A tokenizer
attached to a model (``tokenizer_from_files(d, vocab_size=...)``) has no more ids than the model's vocabulary;
``check_ids_in_vocab`` refuses ids past it.

``check_fits`` (and ``encode_prompt_within``) refuses a text that cannot fit ``limit`` tokens without tokenizing it
whole first: a text longer than a few pieces is counted a piece at a time, and refused once the pieces counted so
far hold well over the limit (a 4 MiB text made a list of 4 million ids, about 100 MiB, only to be refused).

A prompt's text becomes ids through ``encode_prompt``: with a BOS in front when the checkpoint's
``tokenizer_config.json`` says ``"add_bos_token": true`` (as transformers' Llama tokenizers and vLLM do; a
missing key means no BOS, the byte tokenizer's and the bundled demo's convention). ``colm generate``, the
router's text prompts, ``/v1/completions`` and ``/tokenize`` all go through it, so their ids agree.
"""

from __future__ import annotations

from pathlib import Path


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet (GPT-2's): each byte as a printable character; the printable bytes map to
    themselves, the others to the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


class ByteTokenizer:
    """UTF-8 bytes 0..255, then BOS=256, EOS=257, PAD=258 (vocab >= 259)."""

    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def decode_bytes(self, ids) -> bytes:
        return bytes(i for i in ids if 0 <= i < 256)

    def token_bytes(self, vocab_size: int) -> list[bytes]:
        """Each id's bytes below ``vocab_size`` (special and unused ids: empty), for structured output's grammar."""
        return [bytes([i]) for i in range(256)] + [b""] * (vocab_size - 256)

    def spec(self) -> dict:
        return {"kind": "byte"}


class SentencePieceTokenizer:
    def __init__(self, model_file: str) -> None:
        import sentencepiece as spm

        self.path = str(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id] + ids if add_bos and self.bos_id >= 0 else ids

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def spec(self) -> dict:
        return {"kind": "sentencepiece", "file": "tokenizer.model"}


class HFTokenizer:
    def __init__(self, json_file: str, bos: str | None = None, eos: str | None = None) -> None:
        from tokenizers import Tokenizer

        self.path = str(json_file)
        self.tok = Tokenizer.from_file(self.path)
        self.vocab_size = self.tok.get_vocab_size()
        self.bos_id = self._find(bos, ["<|begin_of_text|>", "<s>", "<bos>"])
        self.eos_id = self._find(eos, ["<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>"])
        if type(self.tok.decoder).__name__ == "ByteLevel":  # GPT-2 / Llama 3 style: a token's bytes are exact
            self._unicode_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
            self._added = set(self.tok.get_added_tokens_decoder())
            self.decode_bytes = self._byte_level_bytes

    def _byte_level_bytes(self, ids) -> bytes:
        """The tokens' own bytes (a token may hold part of a UTF-8 character), joined; added tokens (BOS, EOS, ...),
        which ``decode`` leaves out, give none."""
        out = bytearray()
        for i in ids:
            i = int(i)
            piece = self.tok.id_to_token(i) if i not in self._added else None
            if piece:
                out += bytes(self._unicode_to_byte[c] for c in piece)
        return bytes(out)

    def _find(self, explicit, candidates) -> int:
        for tok in ([explicit] if explicit else []) + candidates:
            i = self.tok.token_to_id(tok)
            if i is not None:
                return i
        return -1

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos and self.bos_id >= 0 else ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def spec(self) -> dict:
        return {"kind": "hf", "file": "tokenizer.json"}


def load_tokenizer(spec: dict | None, directory: str | Path | None = None):
    """Build the tokenizer a checkpoint's ``config.json`` names (files looked up in ``directory``)."""
    spec = spec or {"kind": "byte"}
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind not in ("sentencepiece", "hf"):
        raise ValueError(f"tokenizer kind {kind!r}: allowed are 'byte', 'sentencepiece', 'hf'")
    file = Path(directory or ".") / spec.get("file", "tokenizer.model" if kind == "sentencepiece" else "tokenizer.json")
    if not file.is_file():
        raise ValueError(f"tokenizer file {file} not found (tokenizer kind {kind!r})")
    return SentencePieceTokenizer(str(file)) if kind == "sentencepiece" else HFTokenizer(str(file))


def tokenizer_from_files(directory: str | Path, vocab_size: int | None = None):
    """Pick the tokenizer of a directory by its files: tokenizer.json, else tokenizer.model, else bytes. With
    ``vocab_size`` (the model's), ValueError when the tokenizer has more ids than that: its ids past the vocabulary
    have no embedding row, and the model would fail on the first prompt holding one."""
    d = Path(directory)
    if (d / "tokenizer.json").is_file():
        tok, source = HFTokenizer(str(d / "tokenizer.json")), d / "tokenizer.json"
    elif (d / "tokenizer.model").is_file():
        tok, source = SentencePieceTokenizer(str(d / "tokenizer.model")), d / "tokenizer.model"
    else:
        tok, source = ByteTokenizer(), None
    if vocab_size is not None and tok.vocab_size > vocab_size:
        if source is None:
            raise ValueError(f"{d}: no tokenizer.json or tokenizer.model, and the model's vocab_size={vocab_size} is "
                             f"too small for the byte tokenizer ({tok.vocab_size} ids): put the model's tokenizer "
                             "files there")
        raise ValueError(f"{source}: {tok.vocab_size} ids do not fit the model's vocab_size={vocab_size}: it is not "
                         "this model's tokenizer")
    return tok


def check_ids_in_vocab(ids, vocab_size: int, what: str = "prompt") -> None:
    """ValueError naming the first of ``ids`` outside ``[0, vocab_size)``: such an id has no embedding row (the
    checkpoint's tokenizer has more ids than its model's vocabulary)."""
    for i, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise ValueError(f"{what}: token id {t} (position {i}) is outside the model's vocabulary "
                             f"(vocab_size={vocab_size}): the checkpoint's tokenizer does not match its model")


def load_checkpoint_tokenizer(model_dir: str | Path):
    from colm.checkpoint import read_meta

    tok = load_tokenizer(read_meta(model_dir).get("tokenizer"), model_dir)
    tok.model_dir = str(model_dir)  # where the HTTP API finds tokenizer_config.json (colm.chat_template)
    tok.add_bos_token = read_add_bos_token(model_dir)
    return tok


def read_add_bos_token(model_dir: str | Path | None) -> bool:
    """``add_bos_token`` of the directory's ``tokenizer_config.json`` (False when the file or the key is missing)."""
    import json

    f = Path(model_dir) / "tokenizer_config.json" if model_dir else None
    if f is None or not f.is_file():
        return False
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{f}: invalid JSON ({e})") from None
    return add_bos_token_of(raw, f)


def add_bos_token_of(raw: dict, source) -> bool:
    """``add_bos_token`` of a parsed ``tokenizer_config.json`` (``source``: where it was read, for the error)."""
    value = raw.get("add_bos_token", False)
    if not isinstance(value, bool):
        raise ValueError(f"{source}: add_bos_token={value!r}, must be true or false")
    return value


def check_fits(encode, text: str, limit: int, what: str = "prompt") -> None:
    """ValueError when ``text`` cannot fit ``limit`` tokens of ``encode`` (text -> ids), found without tokenizing a
    long text whole: pieces of ``8 * limit`` characters (at least 4096) are counted one by one (their ids dropped, at
    most one piece's held at a time), and the text is refused once they hold more than twice the limit. Cutting a
    text into pieces changes its count by a few tokens per cut at most, so a text refused this way holds more than
    ``limit`` tokens. A text of up to two pieces is left to the caller's own count."""
    piece = max(4096, 8 * limit)
    if len(text) <= 2 * piece:
        return
    counted = 0
    for start in range(0, len(text), piece):
        counted += len(encode(text[start:start + piece]))
        if counted > 2 * limit + 64:
            raise ValueError(f"{what} ({len(text)} characters) exceeds the context of {limit} tokens: its first "
                             f"{min(len(text), start + piece)} characters alone are about {counted} tokens")


def encode_prompt_within(tok, text: str, limit: int) -> list[int]:
    """``encode_prompt(tok, text)``, or ValueError (``check_fits``) when the text cannot fit ``limit`` tokens."""
    check_fits(tok.encode, text, limit)
    return encode_prompt(tok, text)


def encode_prompt(tok, text: str) -> list[int]:
    """A prompt's ids: BOS first when the checkpoint asks for it (see the module docstring)."""
    return tok.encode(text, add_bos=bool(getattr(tok, "add_bos_token", False)))
