"""``colm convert-hf``: Hugging Face Llama checkpoint -> one-chain colm checkpoint, with the source's tokenizer
files (tokenizer.json / tokenizer.model, tokenizer_config.json, chat_template.jinja, special_tokens_map.json), so
the served model keeps its chat template and special tokens. Without tokenizer files the byte tokenizer is attached,
which needs a vocabulary of at least its 259 ids; a tokenizer with more ids than the model's vocabulary is refused."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("convert-hf", help="convert a Hugging Face Llama checkpoint directory into a one-chain colm checkpoint")
    p.add_argument("src", help="HF directory with config.json and model.safetensors (or a sharded index)")
    p.add_argument("dst", help="output colm checkpoint directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="default: keep the source dtype")
    p.set_defaults(func=run)


CHAT_FILES = ("chat_template.jinja", "special_tokens_map.json")


def run(args) -> int:
    import torch

    from colm.chat_template import TokenizerConfig

    from colm import checkpoint
    from colm.hf_import import load_hf_llama
    from colm.tokenizer import tokenizer_from_files

    model = load_hf_llama(args.src, dtype=None if args.dtype is None else getattr(torch, args.dtype))
    tok = tokenizer_from_files(args.src, vocab_size=model.cfg.vocab_size)  # checked before anything is written
    checkpoint.save(model, args.dst, tokenizer=tok.spec(), copy_tokenizer_from=args.src)
    copy_chat_files(args.src, args.dst)
    chat = TokenizerConfig.load(args.dst, tok).chat_template is not None
    print(f"converted {args.src} -> {args.dst}: {model.cfg.num_params() / 1e6:.1f}M parameters, one chain of "
          f"{model.cfg.n_heads} heads, tokenizer {tok.spec()['kind']}, "
          f"{'a' if chat else 'no'} chat template")
    return 0


def copy_chat_files(src, dst) -> None:
    """What AutoTokenizer reads beside tokenizer.json / tokenizer_config.json (which checkpoint.save copies): the
    chat template as its own file (transformers >= 4.43 writes chat_template.jinja) and the special tokens' map."""
    import shutil
    from pathlib import Path

    for name in CHAT_FILES:
        f = Path(src) / name
        if f.is_file() and f.resolve() != (Path(dst) / name).resolve():
            shutil.copy(f, Path(dst) / name)
