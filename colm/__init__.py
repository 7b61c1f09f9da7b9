"""colm: Chain-of-Model language models (CoLM / CoLM-Air) — model library and serving system.

The model library lives here (config, chain layers, model, checkpoint I/O, HF import, expansion,
tokenizers, reference generation, CLI); kernels, workers, router and deploy tooling are the
subpackages ``colm.kernels``, ``colm.prefill_worker``, ``colm.decode_worker``, ``colm.router`` and
``colm.deploy``.
"""

__version__ = "0.1.0"
