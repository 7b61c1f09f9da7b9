"""A tiny random transformers Llama converted by ``colm convert-hf``, its greedy reference, and a router over a
backend for that checkpoint: shared by the tests that serve converted Llamas."""

from __future__ import annotations

from pathlib import Path


def converted_llama(tmp: Path, seed: int, **config):
    """(the HF model, its saved folder, the converted colm checkpoint) of a random ``LlamaForCausalLM(config)``
    drawn with ``torch.manual_seed(seed)``; ``config``: ``transformers.LlamaConfig`` fields."""
    import torch
    import transformers

    from colm.cli import main

    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    hf.save_pretrained(tmp / "hf")
    assert main(["convert-hf", str(tmp / "hf"), str(tmp / "colm")]) == 0
    return hf, str(tmp / "hf"), str(tmp / "colm")


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy continuation of ``prompt`` by ``n`` tokens (no end-of-sequence)."""
    import torch

    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def router_over(backend, ckpt: str):
    """A router (on a background loop, real gRPC on loopback) over ``backend`` for the checkpoint ``ckpt``."""
    from colm import checkpoint
    from colm.router.config import RouterConfig
    from colm.router.core import Router
    from colm.router.server import ThreadedRouterServer
    from colm.tokenizer import load_checkpoint_tokenizer

    router = Router(RouterConfig(grpc_port=0, http_port=None, poll_interval_s=0.05, rebalance=False),
                    checkpoint.load_config(ckpt), load_checkpoint_tokenizer(ckpt), backend)
    return ThreadedRouterServer(router)
