"""lm-evaluation-harness's own `local-completions` model, unmodified, against the router's
OpenAI-compatible HTTP endpoint (remote tokenizer via /tokenize, /detokenize, /tokenizer_info;
loglikelihood via echo + logprobs), scored against an independent reference."""

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")
pytest.importorskip("datasets")

from colm.model import CoLM  # noqa: E402
from colm.presets import preset  # noqa: E402
from colm.router.config import RouterConfig  # noqa: E402
from colm.router.core import Router  # noqa: E402
from colm.router.local_backend import LocalBackend  # noqa: E402
from colm.tokenizer import ByteTokenizer  # noqa: E402
from router_helpers import BackgroundRouter  # noqa: E402


def ref_loglik(model, scale, context: str, continuation: str) -> float:
    tok = ByteTokenizer()
    ctx, cont = tok.encode(context), tok.encode(continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids, scale=scale)[0, :-1].float(), -1)
    targets = ids[0, len(ctx):]
    return logp[len(ctx) - 1:].gather(1, targets[:, None]).sum().item()


def test_local_completions_multiple_choice_matches_reference(tmp_path):
    import lm_eval.models.openai_completions  # noqa: F401  registers local-completions even if another test
    from lm_eval.tasks import TaskManager     # already materialised lm-eval's model registry

    cfg = preset("tiny-air")
    model = CoLM(cfg).reset_parameters(seed=3, std=0.3).eval()
    g = torch.Generator().manual_seed(0)
    # equal-length choices, so accuracy reflects the model's scores, not the continuations' lengths
    docs = []
    for i in range(8):
        choices = ["".join(chr(97 + int(c)) for c in torch.randint(0, 26, (3,), generator=g)) for _ in range(3)]
        docs.append({"question": f"Item {i}:", "choices": choices, "answer": i % 3})
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "task.yaml").write_text(
        "task: colm_remote_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n")
    router = Router(RouterConfig(grpc_port=0, http_port=0, metrics_port=0), cfg, ByteTokenizer(), LocalBackend(model))
    bg = BackgroundRouter(router)
    try:
        # no scale in the request: the router serves the full scale
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"base_url={bg.http_url}/v1/completions,model=colm,tokenizer_backend=remote,"
                       f"tokenized_requests=True,num_concurrent=1,max_retries=1",
            tasks=["colm_remote_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
            bootstrap_iters=0, log_samples=False,
        )
        acc = out["results"]["colm_remote_mc"]["acc,none"]
        correct = 0
        for d in docs:
            # lm-eval joins context and choice with its default target delimiter " "
            scores = [ref_loglik(model, cfg.num_chains, d["question"], " " + c) for c in d["choices"]]
            correct += int(max(range(3), key=scores.__getitem__) == d["answer"])
        assert 0 < correct < len(docs), "a trivial accuracy would not test the scores"
        assert acc == pytest.approx(correct / len(docs))
    finally:
        bg.stop()
