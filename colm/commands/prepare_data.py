"""``colm prepare-data INPUT... --out DIR``: tokenize text into memory-mapped train/val token files."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("prepare-data", help="tokenize text files/directories (or pydoc:topics) into token files")
    p.add_argument("inputs", nargs="+", help="files, directories (searched for --suffix files) or 'pydoc:topics'")
    p.add_argument("--out", required=True, help="output directory (train.bin, val.bin + .json sidecars)")
    p.add_argument("--tokenizer", default="byte",
                   help="'byte', a colm checkpoint directory, a tokenizer.json or a tokenizer.model (default: byte)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out (default 0.05)")
    p.add_argument("--suffix", action="append", default=None, help="file suffixes to read from directories "
                   "(repeatable; default .txt .md .rst .py)")
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def resolve_tokenizer(name: str):
    from pathlib import Path

    from colm import tokenizer as tk

    if name == "byte":
        return tk.ByteTokenizer()
    path = Path(name)
    if path.is_dir():
        return tk.load_checkpoint_tokenizer(path) if (path / "config.json").is_file() else tk.tokenizer_from_files(path)
    if path.suffix == ".json" and path.is_file():
        return tk.HFTokenizer(str(path))
    if path.suffix == ".model" and path.is_file():
        return tk.SentencePieceTokenizer(str(path))
    raise ValueError(f"--tokenizer {name!r}: not 'byte', a directory, a tokenizer.json or a tokenizer.model")


def run(args) -> int:
    from colm.train import data

    tok = resolve_tokenizer(args.tokenizer)
    suffixes = tuple(s if s.startswith(".") else f".{s}" for s in args.suffix) if args.suffix else data.TEXT_SUFFIXES
    summary = data.prepare_token_files(list(args.inputs), args.out, tok, args.val_fraction, args.seed, args.max_docs,
                                       suffixes)
    for split, s in summary.items():
        print(f"{split}: {s['num_tokens']} tokens from {s['num_docs']} documents -> {s['path']}")
    return 0
