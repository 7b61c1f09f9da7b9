"""A checkpoint's ``tokenizer_config.json`` as transformers' AutoTokenizer reads it: the chat template and the
named special tokens, and text-to-ids that honours those tokens.

``TokenizerConfig.load(model_dir, tokenizer)`` reads ``tokenizer_config.json`` (``chat_template`` as a string
or as a list of named templates, of which ``default`` is used; a ``chat_template.jinja`` file beside it wins,
as in transformers 4.43+), and the special tokens ``bos_token``, ``eos_token``, ``unk_token``, ``sep_token``,
``pad_token``, ``cls_token``, ``mask_token`` (strings, or serialized AddedTokens ``{"content": ...}``; names
missing there are taken from a legacy ``special_tokens_map.json``).
A tokenizer without a config still gets names for its BOS / EOS (the HF / SentencePiece piece of that id;
``<|begin_of_text|>`` / ``<|end_of_text|>`` / ``<|pad|>`` for the byte tokenizer, as the demo's
tokenizer.json names them), so ``/tokenizer_info`` never reports a null EOS.

``render(messages)`` renders the template the way ``apply_chat_template`` does: an immutable sandboxed jinja2
environment with ``trim_blocks`` / ``lstrip_blocks`` and the ``loopcontrols`` extension, a ``tojson`` that
keeps non-ASCII, the globals ``raise_exception`` and ``strftime_now``, and the variables ``messages``,
``add_generation_prompt`` and every special token by name. A template error is a ValueError (a 400). A
``developer`` message (OpenAI's newer name for system instructions) reaches a template that never names that role
as a ``system`` message, as OpenAI treats it for models without that role.

``encode(text)``: HF ``tokenizer.json`` tokenizers find their added special tokens in text themselves; for
the byte and SentencePiece tokenizers the text is split on the special tokens' strings first, so a
rendered ``{{ eos_token }}`` becomes the EOS id (as a transformers slow tokenizer does), and
``/tokenize`` of the EOS name gives the EOS id.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from colm.tokenizer import add_bos_token_of

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# the names the demo checkpoint's tokenizer.json gives the byte tokenizer's ids 256..258
BYTE_NAMES = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|pad|>"}


class NoChatTemplate(ValueError):
    pass


def _token_str(v) -> str | None:
    if isinstance(v, dict):  # a serialized AddedToken
        v = v.get("content")
    return v if isinstance(v, str) and v else None


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class TokenizerConfig:
    """The chat template and special tokens of one tokenizer (see the module docstring)."""

    def __init__(self, tokenizer, chat_template: str | None = None, special: dict[str, str] | None = None,
                 add_bos_token: bool | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        # tokenizer_config.json's add_bos_token (colm.tokenizer.encode_prompt): special tokens added to a prompt
        self.add_bos_token = bool(getattr(tokenizer, "add_bos_token", False) if add_bos_token is None else add_bos_token)
        self.special = dict(special or {})  # name -> string, e.g. {"eos_token": "</s>"}
        for name, tid in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id),
                          ("pad_token", getattr(tokenizer, "pad_id", None))):
            if name not in self.special and tid is not None and tid >= 0:
                s = self._piece(tid, name)
                if s:
                    self.special[name] = s
        self.ids = {}  # special string -> id, for the ones this tokenizer has
        for name, s in self.special.items():
            tid = self._token_id(name, s)
            if tid is not None:
                self.ids[s] = tid
        self._native = hasattr(tokenizer, "tok")  # an HF tokenizers.Tokenizer parses added tokens itself
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(self.ids, key=len, reverse=True))) + ")") \
            if self.ids and not self._native else None

    @classmethod
    def load(cls, model_dir, tokenizer) -> "TokenizerConfig":
        template, special, add_bos = None, {}, None  # add_bos None: the tokenizer's own (no config file here)
        d = Path(model_dir) if model_dir else None
        if d is not None and (d / "tokenizer_config.json").is_file():
            try:
                raw = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
            except ValueError as e:
                raise ValueError(f"{d / 'tokenizer_config.json'}: invalid JSON ({e})") from None
            add_bos = add_bos_token_of(raw, d / "tokenizer_config.json")
            for name in SPECIAL_NAMES:
                if (s := _token_str(raw.get(name))) is not None:
                    special[name] = s
            template = raw.get("chat_template")
            if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default")
            if not isinstance(template, str) or not template:
                template = None
        if d is not None and (d / "special_tokens_map.json").is_file():  # older checkpoints keep the names here
            try:
                raw = json.loads((d / "special_tokens_map.json").read_text(encoding="utf-8"))
            except ValueError as e:
                raise ValueError(f"{d / 'special_tokens_map.json'}: invalid JSON ({e})") from None
            for name in SPECIAL_NAMES:
                if name not in special and (s := _token_str(raw.get(name))) is not None:
                    special[name] = s
        if d is not None and (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(tokenizer, template, special, add_bos)

    def _piece(self, tid: int, name: str) -> str | None:
        t = self.tokenizer
        if hasattr(t, "tok"):
            return t.tok.id_to_token(tid)
        if hasattr(t, "sp"):
            return t.sp.id_to_piece(tid)
        return BYTE_NAMES.get(name)

    def _token_id(self, name: str, s: str) -> int | None:
        t = self.tokenizer
        if hasattr(t, "tok"):
            return t.tok.token_to_id(s)
        if hasattr(t, "sp"):
            i = t.sp.piece_to_id(s)
            return i if t.sp.id_to_piece(i) == s else None
        return {"bos_token": t.bos_id, "eos_token": t.eos_id, "pad_token": getattr(t, "pad_id", None)}.get(name)

    def token_id(self, name: str) -> int | None:
        """The id of a named special token (``"eos_token"``), or None."""
        s = self.special.get(name)
        return None if s is None else self.ids.get(s)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``, special tokens' strings as their ids. ``add_special_tokens``: a BOS first when
        the tokenizer config asks for one (``add_bos_token``) and the text does not already begin with it."""
        ids = self._encode(text)
        bos = self.tokenizer.bos_id
        if add_special_tokens and self.add_bos_token and bos is not None and bos >= 0 and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def _encode(self, text: str) -> list[int]:
        if self._split is None:
            return self.tokenizer.encode(text)
        out: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                out.append(self.ids[part])
            elif part:
                out.extend(self.tokenizer.encode(part))
        return out

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None) -> str:
        """The prompt text of a conversation (``tools``: the request's function tools, which the template may
        describe, as transformers passes them); NoChatTemplate / ValueError (both 400s) when it cannot be made."""
        if self.chat_template is None:
            raise NoChatTemplate("this model has no chat template (no chat_template in its tokenizer_config.json): "
                                 "use /v1/completions with a prompt")
        import jinja2

        try:
            template = _compile(self.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the model's chat template does not compile: {e}") from None
        if "developer" not in self.chat_template:  # OpenAI's newer name for system instructions
            messages = [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                   **self.special)
        except Exception as e:  # raise_exception() of the template, or what it does with the messages: a 400
            raise ValueError(f"messages: the chat template rejected the conversation: {e}") from None
