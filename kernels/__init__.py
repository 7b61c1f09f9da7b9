"""GPU kernels for CoLM, each beside its plain-PyTorch reference (import name: ``colm.kernels``).

``chain_linear`` is the one entry point the model uses for a chain Linear: it runs the Triton
block-sparse kernel on CUDA when Triton is importable, and ``chain_linear_ref`` otherwise.
"""

from colm.kernels.chain_linear import chain_linear, chain_linear_ref

__all__ = ["chain_linear", "chain_linear_ref"]
