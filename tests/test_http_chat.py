"""/v1/chat/completions: the chat template as transformers renders it, the official ``openai`` client against a
router (greedy output equal to ``colm.generate`` on the rendered prompt), streaming, validation, and
``colm convert-hf`` keeping the tokenizer config."""

import json

import pytest
import torch

from colm.assets import demo_model_dir
from colm.chat_template import NoChatTemplate, TokenizerConfig
from colm.generate import generate
from colm.model import CoLM
from colm.presets import preset
from colm.router.config import RouterConfig
from colm.router.core import Router
from colm.router.local_backend import LocalBackend
from colm.sampling import SamplingParams
from colm.tokenizer import ByteTokenizer, HFTokenizer, load_checkpoint_tokenizer
from router_helpers import BackgroundRouter, chat_router, post_json

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

# Llama-2's template (abridged): a system prompt folded into the first user turn, alternation enforced with
# raise_exception, bos/eos by name, loop variables, whitespace control
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
# ChatML with tojson of non-ASCII text, trim_blocks / lstrip_blocks newlines, and the generation prompt
CHATML = """{% for message in messages %}
    {{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}
    {% if message.name is defined %}{{ message.name | tojson }}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|im_start|>assistant\n' }}
{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "héllo there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3? 漢字"}],
]


def hf_tokenizer(path, template: str):
    """A tiny byte-level BPE PreTrainedTokenizerFast with Llama's and ChatML's special tokens, saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[c] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = template
    tok.save_pretrained(path)
    return tok


@pytest.mark.parametrize("template", [LLAMA2, CHATML], ids=["llama2", "chatml"])
def test_rendering_and_ids_equal_transformers_apply_chat_template(tmp_path, template):
    hf = hf_tokenizer(tmp_path, template)
    ours = TokenizerConfig.load(tmp_path, HFTokenizer(str(tmp_path / "tokenizer.json")))
    assert ours.special["bos_token"] == "<s>" and ours.special["eos_token"] == "</s>"
    for messages in CONVERSATIONS + [[{"role": "user", "content": "hi", "name": "Ünï"}]]:
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.render(messages) == want
        want_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert ours.encode(want) == want_ids
        assert ours.render(messages, add_generation_prompt=False) == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False)
    if template is LLAMA2:  # the template's raise_exception: a ValueError (400) with its message
        bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        with pytest.raises(Exception, match="must alternate"):
            hf.apply_chat_template(bad, tokenize=False)
        with pytest.raises(ValueError, match="must alternate"):
            ours.render(bad)


def test_template_in_tokenizer_config_and_named_templates(tmp_path):
    cfg = {"eos_token": {"content": "<|eos|>", "special": True}, "chat_template": [
        {"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ messages[0].content }}!"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tc = TokenizerConfig.load(tmp_path, ByteTokenizer())
    assert tc.render([{"role": "user", "content": "hi"}]) == "hi!"
    assert tc.special["eos_token"] == "<|eos|>" and tc.encode("a<|eos|>") == [97, ByteTokenizer.eos_id]
    with pytest.raises(NoChatTemplate, match="no chat template"):
        TokenizerConfig.load(None, ByteTokenizer()).render([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="sandbox|unsafe|not safe|access"):  # the sandbox holds
        TokenizerConfig(ByteTokenizer(), "{{ messages.__class__.__mro__ }}").render([{"role": "user", "content": "x"}])


def test_demo_asset_ships_a_chat_template():
    import tomllib
    from pathlib import Path

    d = demo_model_dir()
    tc = TokenizerConfig.load(d, load_checkpoint_tokenizer(d))
    text = tc.render([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "More"}])
    assert text == "S\n\nUser: Hi\nAssistant: Yo<|end_of_text|>\nUser: More\nAssistant:"
    assert ByteTokenizer.eos_id in tc.encode(text)
    if (d / "tokenizer.json").is_file():  # the demo's HF twin of the byte tokenizer: AutoTokenizer agrees
        hf = transformers.AutoTokenizer.from_pretrained(str(d))
        for messages in CONVERSATIONS:
            want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            assert tc.render(messages) == want
            assert tc.encode(want) == hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["colm.assets"]
    assert any(Path("demo-python-air/tokenizer_config.json").match(g) for g in globs)


def test_convert_hf_keeps_the_tokenizer_config_and_chat_template(tmp_path):
    from colm.cli import main

    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    src = tmp_path / "hf"
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    hf = hf_tokenizer(src, LLAMA2)
    dst = tmp_path / "colm"
    assert main(["convert-hf", str(src), str(dst)]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()
    tok = load_checkpoint_tokenizer(dst)
    tc = TokenizerConfig.load(tok.model_dir, tok)
    messages = CONVERSATIONS[1]
    assert tc.render(messages) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tc.token_id("eos_token") == hf.eos_token_id


# ---- against a router ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CoLM(preset("tiny-air")).reset_parameters(seed=1).eval()


@pytest.fixture(scope="module")
def served(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    bg, client, tok = chat_router(model, d)
    yield bg, client, TokenizerConfig.load(d, tok)
    bg.stop()


MESSAGES = [{"role": "system", "content": "You answer."}, {"role": "user", "content": "Say something"}]


def reference(model, tc, messages, n, scale, **kw):
    ids = tc.encode(tc.render(messages))
    return generate(model, ids, SamplingParams(max_new_tokens=n, **kw), scale=scale, eos_id=ByteTokenizer.eos_id,
                    decode=ByteTokenizer().decode)


def test_openai_client_greedy_chat_equals_generate_on_the_rendered_prompt(served, model):
    bg, client, tc = served
    for scale in (1, 2):
        ref = reference(model, tc, MESSAGES, 12, scale)
        r = client.chat.completions.create(model=f"colm@{scale}", messages=MESSAGES, max_completion_tokens=12,
                                           temperature=0)
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == f"colm@{scale}"
        choice = r.choices[0]
        assert choice.message.role == "assistant" and choice.message.content == ByteTokenizer().decode(ref.token_ids)
        assert choice.finish_reason == ref.finish_reason == "length"
        assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(tc.encode(tc.render(MESSAGES)))
        assert r.usage.total_tokens == r.usage.prompt_tokens + 12
        assert choice.model_extra["scale"] == scale
        legacy = client.chat.completions.create(model="colm", messages=MESSAGES, max_tokens=12, temperature=0,
                                                extra_body={"scale": scale})
        assert legacy.choices[0].message.content == choice.message.content and legacy.model == "colm"


def test_openai_client_streaming_chat(served, model):
    bg, client, tc = served
    ref = reference(model, tc, MESSAGES, 10, 2)
    stream = client.chat.completions.create(model="colm", messages=MESSAGES, max_completion_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"colm": {"scale": 2}})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content) == ByteTokenizer().decode(ref.token_ids)
    assert [c.choices[0].finish_reason for c in content][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 10
    plain = list(client.chat.completions.create(model="colm", messages=MESSAGES, max_completion_tokens=3,
                                                stream=True, temperature=0))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "length"


def test_chat_stop_strings_seed_logprobs_and_list_content(served, model):
    bg, client, tc = served
    ref = reference(model, tc, MESSAGES, 24, 2)
    text = ByteTokenizer().decode(ref.token_ids)
    i = next(i for i in range(4, len(text)) if text[i:i + 2].isascii() and text[i:i + 2].isprintable())
    stop = text[i:i + 2]  # whole characters: a random model's bytes are not all UTF-8
    cut = text[:text.index(stop)]
    for stream in (False, True):
        kw = dict(model="colm@2", messages=MESSAGES, max_completion_tokens=24, temperature=0, stop=[stop])
        if stream:
            got = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                          if c.choices)
        else:
            r = client.chat.completions.create(**kw)
            got = r.choices[0].message.content
            assert r.choices[0].finish_reason == "stop"
        assert got == cut, (stream, got, cut, stop)
    kept = client.chat.completions.create(model="colm@2", messages=MESSAGES, max_completion_tokens=24, temperature=0,
                                          stop=stop, extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].message.content == cut + stop
    # sampling with a seed: reproducible
    a, b = (client.chat.completions.create(model="colm", messages=MESSAGES, max_completion_tokens=8, temperature=0.9,
                                           top_p=0.95, seed=1234).choices[0].message.content for _ in range(2))
    assert a == b
    # content as text parts is joined with newlines
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "something"}]}]
    joined = [{"role": "user", "content": "Say\nsomething"}]
    r1 = client.chat.completions.create(model="colm@1", messages=parts, max_completion_tokens=6, temperature=0)
    r2 = client.chat.completions.create(model="colm@1", messages=joined, max_completion_tokens=6, temperature=0)
    assert r1.choices[0].message.content == r2.choices[0].message.content
    assert r1.usage.prompt_tokens == r2.usage.prompt_tokens
    # logprobs: the sampled tokens' logprobs, equal to the model's
    r = client.chat.completions.create(model="colm@1", messages=MESSAGES, max_completion_tokens=4, temperature=0,
                                       logprobs=True)
    lps = r.choices[0].logprobs.content
    ids = tc.encode(tc.render(MESSAGES)) + reference(model, tc, MESSAGES, 4, 1).token_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]), scale=1)[0].float(), -1)
    want = [logp[len(ids) - 5 + i, ids[len(ids) - 4 + i]].item() for i in range(4)]
    assert [x.logprob for x in lps] == pytest.approx(want, abs=1e-4)
    assert "".join(x.token for x in lps) == r.choices[0].message.content


def test_chat_default_max_tokens_run_to_eos_or_the_context(served, model):
    bg, client, tc = served
    r = client.chat.completions.create(model="colm@1", messages=MESSAGES, temperature=0)
    n_prompt = r.usage.prompt_tokens
    assert r.choices[0].finish_reason == "stop" or n_prompt + r.usage.completion_tokens == model.cfg.max_seq_len


BAD_CHAT = [
    ({"messages": []}, "messages", "non-empty"),
    ({"messages": "hi"}, "messages", "list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "system, user, assistant, tool"),
    ({"messages": [{"content": "x"}]}, "messages[0].role", "missing"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "null"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type", "text"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, "messages[0].content[0].text",
     "string"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content[0]", "text"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls", "not supported"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "names the call"),
    ({"messages": ["hi"]}, "messages[0]", "object"),
    ({"max_completion_tokens": -1}, "max_completion_tokens", "allowed"),
    ({"max_tokens": "3"}, "max_tokens", "integer"),
    ({"max_completion_tokens": 5000}, "prompt", "exceeds the context"),
    ({"messages": [{"role": "user", "content": "b" * 400_000}]}, "messages", "exceeds the context of"),
    ({"temperature": "hot"}, "temperature", "number"),
    ({"stop": ["a"] * 17}, "stop", "allowed"),
    ({"seed": -1}, "seed", "allowed"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "allowed"),
    ({"top_logprobs": 3}, "top_logprobs", "needs logprobs: true"),
    ({"tools": [{"type": "function"}]}, "tools", "a tool is"),
    ({"tool_choice": "auto"}, "tool_choice", "no parser"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "allowed types are text, json_object"),
    ({"n": 17}, "n", "allowed"),
    ({"scale": 3}, "scale", "scale=3"),
    ({"scale": 0}, "scale", "allowed"),
    ({"ttft_ms": 0}, "ttft_ms", "allowed"),
    ({"colm": {"deadline_ms": -1}}, "colm.deadline_ms", "allowed"),
    ({"on_miss": "maybe"}, "on_miss", "reject"),
    ({"colm": {"tpot": 5}}, "colm.tpot", "tpot_ms"),
    ({"model": "colm@1", "scale": 2}, "scale", "conflicts"),
    ({"stream_options": {"include_usage": 1}, "stream": True}, "stream_options.include_usage", "boolean"),
]


@pytest.mark.parametrize("change,field,word", BAD_CHAT, ids=[str(c)[:60] for c, _, _ in BAD_CHAT])
def test_bad_chat_requests_are_400_naming_the_field(served, change, field, word):
    bg, _, _ = served
    status, body = post_json(f"{bg.http_url}/v1/chat/completions",
                             {"messages": MESSAGES, "max_completion_tokens": 2, **change})
    assert status == 400, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400
    assert err["param"] == field and field in err["message"] and word in err["message"], err


def test_valid_extras_and_no_ops_are_accepted(served):
    bg, _, _ = served
    ok = {"messages": MESSAGES, "max_completion_tokens": 2, "temperature": 0, "model": "colm@2", "scale": 2,
          "colm": {"deadline_ms": 60_000, "on_miss": "degrade"}, "tool_choice": "none", "tools": [],
          "response_format": {"type": "text"}, "presence_penalty": 0, "user": "u", "n": 1, "some_future": 1,
          "messages_extra": None}
    status, body = post_json(f"{bg.http_url}/v1/chat/completions", ok)
    assert status == 200 and body["choices"][0]["scale"] == 2, body
    status, body = post_json(f"{bg.http_url}/v1/chat/completions",
                             {**ok, "messages": [{"role": "user", "content": "x", "name": None}]})
    assert status == 200, body


def test_a_model_without_a_chat_template_answers_400(model):
    router = Router(RouterConfig(grpc_port=0, http_port=0, poll_interval_s=0.05), model.cfg, ByteTokenizer(),
                    LocalBackend(model))
    bg = BackgroundRouter(router)
    try:
        client = openai.OpenAI(base_url=f"{bg.http_url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="colm", messages=MESSAGES, max_completion_tokens=2)
        assert "no chat template" in e.value.body["message"] and e.value.status_code == 400
        assert client.completions.create(model="colm", prompt="hi", max_tokens=2).choices[0].text is not None
    finally:
        bg.stop()
