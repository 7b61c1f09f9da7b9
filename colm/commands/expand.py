"""``colm expand``: chain expansion of a colm checkpoint (use `colm convert-hf` first for a HF Llama)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("expand", help="add a chain to a checkpoint: the old model becomes the first chains (chain expansion)",
                       description="The new chain's LM-head columns start at zero, so full-scale logits equal the source model's.")
    p.add_argument("src", help="colm checkpoint directory (or a Hugging Face Llama directory, converted on the fly)")
    p.add_argument("dst", help="output directory")
    p.add_argument("--add-chain", type=int, required=True, metavar="HEADS",
                   help="attention heads of the new chain: 1 to the source's head count (at most doubles the width)")
    p.add_argument("--kv-sharing", action="store_true", help="CoLM-Air: K/V from chain 1 only (source must have one chain or be Air)")
    p.add_argument("--std", type=float, default=0.02, help="init std of the new chain's weights (finite, >= 0)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from colm import checkpoint
    from colm.expand import check_std, expand, expanded_config

    src = Path(args.src)
    check_std(args.std)

    def kv_mode(cfg):  # --kv-sharing, else the source's mode (a one-chain source has none yet: plain K/V)
        return True if args.kv_sharing else (None if cfg.num_chains > 1 else False)

    if (src / "config.json").is_file() and '"format": "colm"' not in (src / "config.json").read_text():
        from colm.hf_import import load_hf_llama
        from colm.tokenizer import tokenizer_from_files

        model = load_hf_llama(src)
        tok_spec = tokenizer_from_files(src, vocab_size=model.cfg.vocab_size).spec()
    else:
        cfg = checkpoint.load_config(src)
        # the head count checked before the weights are read
        expanded_config(cfg, args.add_chain, kv_mode(cfg))
        model = checkpoint.load(src)
        tok_spec = checkpoint.read_meta(src).get("tokenizer")
    new = expand(model, args.add_chain, kv_sharing=kv_mode(model.cfg), std=args.std, seed=args.seed)
    checkpoint.save(new, args.dst, tokenizer=tok_spec, copy_tokenizer_from=str(src))
    c = new.cfg
    print(f"expanded {src} -> {args.dst}: chains {list(model.cfg.chains)} -> {list(c.chains)}, dim {c.dim}, "
          f"ffn {c.ffn_hidden}, kv_heads {c.n_kv_heads}, kv_sharing={c.kv_sharing}, {c.num_params() / 1e6:.1f}M parameters")
    return 0
