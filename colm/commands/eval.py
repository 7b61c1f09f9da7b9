"""``colm eval --model DIR --data FILE.bin``: per-scale perplexity table and JSON."""

from __future__ import annotations

from colm.commands.common import add_device_args, resolve_dtype


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of every scale on a held-out token file (table + JSON)")
    p.add_argument("--model", required=True, help="colm checkpoint directory")
    p.add_argument("--data", required=True, help="token file from `colm prepare-data` (e.g. data/val.bin)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--json", default=None, help="write the result here as JSON")
    add_device_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from colm import checkpoint
    from colm.eval.perplexity import format_table, perplexity_per_scale

    model = checkpoint.load(args.model, device=args.device, dtype=resolve_dtype(args.dtype))
    result = perplexity_per_scale(model, args.data, args.seq_len, args.batch_size, args.max_batches, args.device)
    result["model"] = str(args.model)
    result["data"] = str(args.data)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
