"""Per-scale perplexity and the lm-evaluation-harness adapter against independent references. The adapter's
scoring core needs no lm_eval; rolling log-likelihoods and the harness run skip without it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from colm import checkpoint
from colm.generate import generate
from colm.model import CoLM
from colm.presets import preset
from colm.sampling import SamplingParams
from colm.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model"
    checkpoint.save(CoLM(preset("tiny-air")).reset_parameters(std=0.2, seed=5), path)
    return path


class _Req:  # what lm_eval hands a model: an object with .args
    def __init__(self, *args):
        self.args = args


def _ref_logprob(model, scale, ids, n_cont):
    x = torch.tensor([ids[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(x, scale=scale).double(), -1)[0]
    tgt = torch.tensor(ids[1:])
    return float(logp[torch.arange(len(tgt)), tgt][-n_cont:].sum())


def test_perplexity_per_scale_matches_sub_models(ckpt, tmp_path):
    import numpy as np

    from colm.eval.perplexity import perplexity_per_scale
    from colm.train.data import write_token_file

    ids = np.random.default_rng(0).integers(0, 256, 4 * 17 + 1)
    f = write_token_file(tmp_path / "v.bin", ids, {"kind": "byte"}, 259, 1)
    model = checkpoint.load(ckpt)
    res = perplexity_per_scale(model, str(f), seq_len=16, batch_size=2)
    assert res["tokens"] == 4 * 16
    for k in (1, 2):
        sub = checkpoint.load(ckpt, scale=k)  # the scale-k sub-model read on its own
        total = 0.0
        for w in range(4):
            win = ids[w * 16: w * 16 + 17].tolist()
            total -= _ref_logprob(sub, k, win, 16)
        assert res["scales"][k - 1]["loss"] == pytest.approx(total / 64, rel=1e-5)


def test_adapter_scores_match_reference(ckpt):
    from colm.eval.lm_eval_adapter import ColmLM

    tok = ByteTokenizer()
    for scale in (1, 2):
        lm = ColmLM(model=str(ckpt), scale=scale, batch_size=2)
        ref_model = checkpoint.load(ckpt, scale=scale)
        pairs = [("The cat sat on the", " mat"), ("x = ", "1 + 2"), ("", "hello"), ("long " * 5, "tail")]
        got = lm.loglikelihood([_Req(c, k) for c, k in pairs])
        for (ctx, cont), (lp, greedy) in zip(pairs, got):
            ctx_ids = tok.encode(ctx.rstrip()) or [tok.eos_id]
            cont_ids = tok.encode(ctx[len(ctx.rstrip()):] + cont)
            ref = _ref_logprob(ref_model, scale, ctx_ids + cont_ids, len(cont_ids))
            assert lp == pytest.approx(ref, rel=1e-5, abs=1e-4)
            assert isinstance(greedy, bool)
        (gen,) = lm.generate_until([_Req("Hello", {"until": ["\n"], "max_gen_toks": 12})])
        ref_ids = generate(ref_model, tok.encode("Hello"), SamplingParams(max_new_tokens=12), scale=scale,
                           eos_id=tok.eos_id).token_ids
        ref_text = tok.decode([t for t in ref_ids if t != tok.eos_id]).split("\n")[0]
        assert gen == ref_text


def test_adapter_rolling_loglikelihood_matches_reference(ckpt):
    pytest.importorskip("lm_eval")  # the rolling windows are lm_eval's own helpers
    from colm.eval.lm_eval_adapter import ColmLM

    tok = ByteTokenizer()
    text = "def f(x):\n    return x * 2\n"
    for scale in (1, 2):
        lm = ColmLM(model=str(ckpt), scale=scale, batch_size=2)
        (rolling,) = lm.loglikelihood_rolling([_Req(text)])
        ids = [tok.eos_id] + tok.encode(text)
        assert rolling == pytest.approx(_ref_logprob(checkpoint.load(ckpt, scale=scale), scale, ids, len(ids) - 1),
                                        rel=1e-5)


def test_lm_eval_harness_runs_local_json_task(ckpt, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("datasets")
    from lm_eval.tasks import TaskManager

    from colm.eval.lm_eval_adapter import ColmLM

    docs = [{"question": f"Q{i}: 2 + {i} =", "choices": [f" {2 + i}", " banana", " zzz"], "answer": 0} for i in range(6)]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "colm_local_mc.yaml").write_text(
        "task: colm_local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n")
    lm = ColmLM(model=str(ckpt), scale=1)
    out = lm_eval.simple_evaluate(model=lm, tasks=["colm_local_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
                                  bootstrap_iters=0, log_samples=False)
    acc = out["results"]["colm_local_mc"]["acc,none"]
    # independent: pick the choice with the highest reference log-likelihood
    tok, ref = ByteTokenizer(), checkpoint.load(ckpt, scale=1)
    correct = 0
    for d in docs:
        scores = [_ref_logprob(ref, 1, tok.encode(d["question"]) + tok.encode(c), len(tok.encode(c))) for c in d["choices"]]
        correct += int(max(range(3), key=scores.__getitem__) == d["answer"])
    assert math.isclose(acc, correct / len(docs))
    from lm_eval.api.registry import get_model

    assert get_model("colm") is ColmLM


def test_adapter_runs_on_the_cpu_when_cuda_is_asked_for_and_absent():
    """lm-eval's CLI passes device='cuda' by default; without CUDA the adapter runs on the CPU."""
    import torch

    from colm.eval.lm_eval_adapter import device_for

    if torch.cuda.is_available():
        assert device_for("cuda") == "cuda"
    else:
        with pytest.warns(UserWarning, match="CUDA is not available"):
            assert device_for("cuda") == "cpu"
    assert device_for("cpu") == "cpu" and device_for(None) in ("cpu", "cuda")
