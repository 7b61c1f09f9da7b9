"""The chain Linear's autograd Functions: ``ChainLinearFunction`` (the Triton forward, input-gradient and
weight-gradient passes of ``chain_linear_fwd`` / ``chain_linear_bwd``, with bias gradients) and ``_PackCast`` (the
autocast path's cast of the weights into one buffer, so the tile tables keep their offsets).
"""

from __future__ import annotations

import torch

from colm.kernels.chain_linear_bwd import chain_linear_backward_input, chain_linear_backward_weight
from colm.kernels.chain_linear_fwd import chain_linear_forward
from colm.kernels.chain_linear_tables import _layout


class _PackCast(torch.autograd.Function):
    """``weights`` cast to ``dtype`` into one new buffer, returned as views of it (one copy launch per chain, as
    casting each would be). The kernel reaches every chain's weight by its offset from the first, so casts that
    land wherever the allocator puts them would give every step new offsets and a new tile table; in one buffer
    the offsets are the layout's. The backward casts each view's gradient back to its weight's dtype."""

    @staticmethod
    def forward(ctx, dtype, *weights):
        sizes = [w.numel() for w in weights]
        flat = torch.empty(sum(sizes), dtype=dtype, device=weights[0].device)
        outs, off = [], 0
        for w, n in zip(weights, sizes):
            view = flat[off:off + n].view(w.shape)
            view.copy_(w)
            outs.append(view)
            off += n
        ctx.dtypes = [w.dtype for w in weights]
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        return (None, *(None if g is None else g.to(d) for g, d in zip(grads, ctx.dtypes)))


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., F] -> [M, F] with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class ChainLinearFunction(torch.autograd.Function):
    """Autograd wrapper: apply(x, num_chains, has_bias, configs, *weights, *biases)."""

    @staticmethod
    def forward(ctx, x, n, has_bias, configs, *params):
        weights, biases = list(params[:n]), (list(params[n:]) if has_bias else None)
        lay = _layout(weights)
        x2d = _as_rows(x)
        y = chain_linear_forward(x2d, weights, biases, lay, configs.get("fwd"))
        ctx.save_for_backward(x2d, *weights)
        ctx.meta = (n, has_bias, configs, lay, x.shape)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        n, has_bias, configs, lay, x_shape = ctx.meta
        x2d, *weights = ctx.saved_tensors
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        if dy.stride(-1) != 1 or dy.stride(0) != dy.shape[1]:
            dy = dy.contiguous()
        dx = None
        if ctx.needs_input_grad[0]:
            dx = chain_linear_backward_input(dy, weights, lay, configs.get("bwd_i")).view(x_shape)
        need = [i for i in range(n) if ctx.needs_input_grad[4 + i]]
        grads = chain_linear_backward_weight(dy, x2d, lay, need, configs.get("bwd_w"))
        dws = [grads.get(i) for i in range(n)]
        dbs = []
        if has_bias:
            need_b = [ctx.needs_input_grad[4 + n + i] for i in range(n)]
            db_all = dy.sum(0, dtype=torch.float32).to(dy.dtype) if any(need_b) else None  # [ΣO]
            for i in range(n):
                s = lay.out_start[i]
                dbs.append(db_all[s:s + lay.outs[i]] if need_b[i] else None)
        return (dx, None, None, None, *dws, *dbs)

