"""``colm convert-hf``: Hugging Face Llama checkpoint -> one-chain colm checkpoint."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("convert-hf", help="convert a Hugging Face Llama checkpoint directory into a one-chain colm checkpoint")
    p.add_argument("src", help="HF directory with config.json and model.safetensors (or a sharded index)")
    p.add_argument("dst", help="output colm checkpoint directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="default: keep the source dtype")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from colm import checkpoint
    from colm.hf_import import load_hf_llama
    from colm.tokenizer import tokenizer_from_files

    model = load_hf_llama(args.src, dtype=None if args.dtype is None else getattr(torch, args.dtype))
    tok = tokenizer_from_files(args.src)
    checkpoint.save(model, args.dst, tokenizer=tok.spec(), copy_tokenizer_from=args.src)
    print(f"converted {args.src} -> {args.dst}: {model.cfg.num_params() / 1e6:.1f}M parameters, one chain of "
          f"{model.cfg.n_heads} heads, tokenizer {tok.spec()['kind']}")
    return 0
