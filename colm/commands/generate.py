"""``colm generate``: the single-process reference generator."""

from __future__ import annotations

import sys

from colm.commands.common import add_adjust_args, add_device_args, adjust_kwargs, resolve_dtype, resolve_model_dir


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a checkpoint at a chosen scale (the reference path)",
                       description="Greedy when --temperature is 0. --switch-at N --switch-scale K changes the scale "
                                   "from generated token N on (CoLM-Air: no recomputation).")
    p.add_argument("--model", required=True, help="colm checkpoint directory, or 'demo' for the bundled demo model")
    p.add_argument("--scale", type=int, default=None, help="number of active chains (default: all)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--switch-at", type=int, default=None,
                   help="generated-token index (0..max-new-tokens-1) where the scale changes; with --switch-scale")
    p.add_argument("--switch-scale", type=int, default=None, help="scale used from --switch-at on; with --switch-at")
    p.add_argument("--ids", action="store_true", help="print token ids instead of text")
    add_adjust_args(p)
    add_device_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from colm import checkpoint
    from colm.generate import generate
    from colm.sampling import SamplingParams
    from colm.tokenizer import check_ids_in_vocab, encode_prompt, load_checkpoint_tokenizer

    args.model = resolve_model_dir(args.model)
    cfg = checkpoint.load_config(args.model)
    scale = cfg.check_scale(args.scale)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, **adjust_kwargs(args))
    schedule = None
    if (args.switch_at is None) != (args.switch_scale is None):
        given = f"--switch-at {args.switch_at}" if args.switch_scale is None else f"--switch-scale {args.switch_scale}"
        raise ValueError(f"{given} alone: give --switch-at and --switch-scale together (the scale changes to "
                         "--switch-scale from generated token --switch-at on) or neither")
    if args.switch_at is not None:
        if not 0 <= args.switch_at < args.max_new_tokens:
            raise ValueError(f"--switch-at {args.switch_at}: must be a generated-token index in "
                             f"0..{args.max_new_tokens - 1} (--max-new-tokens {args.max_new_tokens})")
        if not 1 <= args.switch_scale <= cfg.num_chains:
            raise ValueError(f"--switch-scale {args.switch_scale}: must be a scale in 1..{cfg.num_chains}")
        schedule = lambda i: args.switch_scale if i >= args.switch_at else scale  # noqa: E731
    top = max(scale, args.switch_scale or 0)
    # The reference loads only the chains it will use.
    model = checkpoint.load(args.model, scale=top, device=args.device, dtype=resolve_dtype(args.dtype)).eval()
    tok = load_checkpoint_tokenizer(args.model)
    prompt_ids = encode_prompt(tok, args.prompt)
    check_ids_in_vocab(prompt_ids, cfg.vocab_size)
    res = generate(model, prompt_ids, params, scale=scale, scale_schedule=schedule, eos_id=tok.eos_id,
                   decode=tok.decode, tokenizer=tok)
    if args.ids:
        print(" ".join(map(str, res.token_ids)))
    else:
        sys.stdout.write(args.prompt + tok.decode(res.token_ids) + "\n")
    print(f"[colm generate] scale={scale} tokens={len(res.token_ids)} finish={res.finish_reason}", file=sys.stderr)
    return 0
