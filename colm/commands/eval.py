"""``colm eval --model DIR --data FILE.bin``: per-scale perplexity table and JSON."""

from __future__ import annotations

from colm.commands.common import add_device_args, resolve_dtype, resolve_model_dir


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of every scale on a held-out token file (table + JSON)")
    p.add_argument("--model", required=True, help="colm checkpoint directory, or 'demo' for the bundled demo model")
    p.add_argument("--data", required=True, help="token file from `colm prepare-data` (e.g. data/val.bin)")
    p.add_argument("--seq-len", type=int, default=256, help="window length, >= 1 (at most the model's context)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per batch, >= 1")
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches, >= 1 (default: all)")
    p.add_argument("--json", default=None, help="write the result here as JSON")
    add_device_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from colm import checkpoint
    from colm.eval.perplexity import format_table, perplexity_per_scale
    from colm.train.data import TokenFile

    for flag, value in (("--seq-len", args.seq_len), ("--batch-size", args.batch_size),
                        ("--max-batches", args.max_batches)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be >= 1")
    args.model = resolve_model_dir(args.model)
    cfg = checkpoint.load_config(args.model)
    if not Path(args.data).is_file():
        raise ValueError(f"--data {args.data}: no such token file (write one with `colm prepare-data`)")
    data_vocab = TokenFile(args.data).meta["vocab_size"]
    if data_vocab > cfg.vocab_size:  # as `colm train` refuses it: ids past the model's vocabulary have no row
        raise ValueError(f"--data {args.data}: its tokenizer's vocabulary of {data_vocab} ids exceeds the model's "
                         f"vocab_size={cfg.vocab_size}")
    model = checkpoint.load(args.model, device=args.device, dtype=resolve_dtype(args.dtype))
    result = perplexity_per_scale(model, args.data, args.seq_len, args.batch_size, args.max_batches, args.device)
    result["model"] = str(args.model)
    result["data"] = str(args.data)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
