"""An lm-evaluation-harness model for colm checkpoints, registered as ``colm`` when lm_eval imports.

    lm_eval --model colm --model_args model=runs/demo/model,scale=1 --tasks ...

``scale`` picks the sub-model (1..number of chains; default the full model), so one checkpoint is
evaluated at every scale of the elastic-inference table. Requests are scored one forward per
batch of (context, continuation) pairs, right-padded: the model is causal, so padding after a
sequence never changes the log-probabilities inside it. ``generate_until`` runs the reference
generator (``colm.generate.generate``) greedily or with the task's temperature.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from colm import checkpoint
from colm.generate import generate
from colm.sampling import SamplingParams
from colm.tokenizer import load_checkpoint_tokenizer

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    HAS_LM_EVAL = True
except ImportError:  # the adapter's scoring core still works without lm_eval
    HAS_LM_EVAL = False
    LM = object

    def register_model(*names):
        return lambda cls: cls


def device_for(requested: str | None) -> str:
    """The device to run on: the one asked for, except CUDA where there is none (then the CPU, with a warning)."""
    if requested and not (str(requested).startswith("cuda") and not torch.cuda.is_available()):
        return str(requested)
    if requested:
        warnings.warn(f"device={requested!r} asked for, but CUDA is not available: running on the CPU", stacklevel=2)
    return "cuda" if torch.cuda.is_available() else "cpu"


@register_model("colm")
class ColmLM(LM):
    def __init__(self, model: str = "", scale: int | str | None = None, device: str | None = None,
                 dtype: str | None = None, batch_size: int | str = 8, max_length: int | str | None = None,
                 max_gen_toks: int | str = 256, pretrained: str | None = None, **_ignored) -> None:
        if HAS_LM_EVAL:
            super().__init__()
        path = model or pretrained
        if not path:
            raise ValueError("colm lm_eval model: pass model=CHECKPOINT_DIR in model_args")
        full_cfg = checkpoint.load_config(path)
        self.scale = full_cfg.check_scale(None if scale in (None, "", "None") else int(scale))
        # lm-eval's CLI passes --device (default "cuda") even on a machine without CUDA: run where the model can
        self.device_name = device_for(device)
        torch_dtype = None if dtype in (None, "auto") else getattr(torch, str(dtype))
        # Only the chosen scale's tensors are read (checkpoint.load slices them).
        self.model = checkpoint.load(path, scale=self.scale, device=self.device_name, dtype=torch_dtype).eval()
        self.tokenizer = load_checkpoint_tokenizer(path)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = min(int(max_length), self.model.cfg.max_seq_len) if max_length else self.model.cfg.max_seq_len
        self.max_gen_toks = int(max_gen_toks)
        eos = getattr(self.tokenizer, "eos_id", -1)
        self.prefix_token_id = eos if eos is not None and eos >= 0 else getattr(self.tokenizer, "bos_id", 0)

    # ---- scoring core ------------------------------------------------------------------------------
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # Trailing context spaces belong to the continuation (as lm_eval's HF model does).
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        cont = whole[len(ctx):]
        if not ctx:
            ctx = [self.prefix_token_id]
        return ctx, cont

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), whether greedy decoding reproduces it) per token pair."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            rows, spans = [], []
            for i in idx:
                ctx, cont = pairs[i]
                if not cont:
                    raise ValueError("loglikelihood: empty continuation")
                whole = (ctx + cont)[-(self.max_length + 1):]
                inputs = whole[:-1]
                rows.append(inputs)
                spans.append((len(inputs) - len(cont), len(inputs), cont))
            width = max(len(r) for r in rows)
            pad = self.prefix_token_id
            x = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device_name)
            logp = F.log_softmax(self.model(x, scale=self.scale).float(), dim=-1)  # [b, t, V]
            for row, i, (lo, hi, cont) in zip(range(len(idx)), idx, spans):
                lp = logp[row, lo:hi]  # [len(cont), V]
                target = torch.tensor(cont, device=lp.device)
                total = float(lp.gather(-1, target[:, None]).sum())
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = (total, greedy)
        return results  # type: ignore[return-value]

    # ---- lm_eval API -------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.score([self._encode_pair(*req.args) for req in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            tokens = self.tokenizer.encode(text)
            windows = [make_disjoint_window(w) for w in
                       get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1)]
            out.append(sum(lp for lp, _ in self.score([(ctx, cont) for ctx, cont in windows if cont])))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            ids = self.tokenizer.encode(context) or [self.prefix_token_id]
            max_new = max(1, min(max_new, self.model.cfg.max_seq_len - 1))
            ids = ids[-(self.model.cfg.max_seq_len - max_new):]
            params = SamplingParams(max_new_tokens=max_new, temperature=temperature, seed=0, stop_strings=tuple(until))
            res = generate(self.model, ids, params, scale=self.scale, eos_id=getattr(self.tokenizer, "eos_id", None),
                           decode=self.tokenizer.decode)
            text = self.tokenizer.decode([t for t in res.token_ids if t != getattr(self.tokenizer, "eos_id", None)])
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out


def main() -> None:
    """``python -m colm.eval.lm_eval_adapter run --model colm --model_args model=DIR,scale=1 --tasks ...``.

    lm_eval has no plugin discovery, so this imports the adapter (registering ``colm``) and then
    hands the command line to lm_eval's own CLI.
    """
    if not HAS_LM_EVAL:
        raise SystemExit("lm_eval is not installed: pip install 'colm[eval]'")
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
