"""Import a Hugging Face Llama checkpoint (``save_pretrained`` layout) as a one-chain colm model.

Reads ``config.json`` (transformers 4.x ``rope_theta``/``rope_scaling`` or 5.x ``rope_parameters``)
and ``model.safetensors`` or the sharded ``model.safetensors.index.json``; renames tensors to colm's
names. With one chain a CoLM is exactly a Llama (paper Corollary 2.1).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from colm.config import ModelConfig, RopeScaling
from colm.model import CoLM

_LAYER_MAP = {
    "self_attn.q_proj.weight": "attn.wq.weights.0",
    "self_attn.k_proj.weight": "attn.wk.weights.0",
    "self_attn.v_proj.weight": "attn.wv.weights.0",
    "self_attn.o_proj.weight": "attn.wo.weights.0",
    "mlp.gate_proj.weight": "ffn.w1.weights.0",
    "mlp.up_proj.weight": "ffn.w3.weights.0",
    "mlp.down_proj.weight": "ffn.w2.weights.0",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_GLOBAL_MAP = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "head.weight"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def hf_config_to_colm(hf: dict, kv_sharing: bool = False) -> ModelConfig:
    """Map a Llama ``config.json`` dict to a one-chain ModelConfig; refuse what colm cannot represent."""
    model_type = hf.get("model_type")
    if model_type not in ("llama", None):
        raise ValueError(f"config.json model_type={model_type!r}: only 'llama' checkpoints can be converted")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"config.json {flag}=true: biased Llama variants are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={hf.get('hidden_act')!r}: only 'silu' (SwiGLU) is supported")
    missing = [k for k in _REQUIRED if hf.get(k) is None]
    if missing:
        raise ValueError(f"config.json has no {', '.join(missing)}: a Llama config.json needs {', '.join(_REQUIRED)}")
    heads = hf["num_attention_heads"]
    dim = hf["hidden_size"]
    head_dim = hf.get("head_dim") or dim // heads
    if head_dim * heads != dim:
        raise ValueError(f"config.json head_dim={head_dim} x num_attention_heads={heads} != hidden_size={dim}")
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    rope_scaling = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        needs = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                 "linear": ("factor",)}.get(kind, ())
        if absent := [k for k in needs if scaling.get(k) is None]:
            raise ValueError(f"config.json rope {kind} needs {', '.join(absent)}")
        if kind == "llama3":
            rope_scaling = RopeScaling("llama3", float(scaling["factor"]), float(scaling["low_freq_factor"]),
                                       float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
        elif kind == "linear":
            rope_scaling = RopeScaling("linear", float(scaling["factor"]))
        elif kind not in (None, "default"):
            raise ValueError(f"config.json rope type {kind!r}: supported are default, linear, llama3")
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads, ffn_hidden=hf["intermediate_size"], chains=(heads,),
        kv_sharing=kv_sharing, rope_theta=float(theta), rope_scaling=rope_scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
    )


def _weight_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: invalid JSON or no weight_map ({type(e).__name__}: {e})") from None
        if absent := [f for f in files if not (src / f).is_file()]:
            raise ValueError(f"{index}: its weight_map names {absent[0]}, which is missing from {src}")
        return [src / f for f in files]
    single = src / "model.safetensors"
    if single.is_file():
        return [single]
    raise ValueError(f"{src}: no model.safetensors or model.safetensors.index.json (PyTorch .bin files are not read)")


def colm_name(hf_name: str) -> str | None:
    """colm parameter name of an HF Llama tensor name (None for tensors colm does not keep)."""
    if hf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[hf_name]
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in _LAYER_MAP:
        return f"layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    raise ValueError(f"unexpected tensor {hf_name!r} in a Llama checkpoint")


def load_hf_llama(src: str | Path, dtype: torch.dtype | None = None, kv_sharing: bool = False) -> CoLM:
    """Build a one-chain CoLM holding the weights of the HF Llama checkpoint directory ``src``."""
    src = Path(src)
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{src}: no config.json")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: invalid JSON ({e})") from None
    cfg = hf_config_to_colm(hf, kv_sharing=kv_sharing)
    with torch.device("meta"):
        model = CoLM(cfg)
    state = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for file in _weight_files(src):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                ours = colm_name(name)
                if ours is None or (ours == "head.weight" and cfg.tie_embeddings):
                    continue
                if ours not in state:  # colm_name maps only Llama names: a layer past num_hidden_layers
                    raise ValueError(f"{file.name}: {name} is a tensor of layer {ours.split('.')[1]}, config.json "
                                     f"num_hidden_layers={cfg.n_layers}")
                t = f.get_tensor(name)
                if tuple(t.shape) != tuple(state[ours].shape):
                    raise ValueError(f"{file.name}: {name} has shape {tuple(t.shape)}, config needs {tuple(state[ours].shape)}")
                loaded[ours] = t if dtype is None else t.to(dtype)
    missing = sorted(set(state) - set(loaded))
    if missing:
        raise ValueError(f"{src}: missing tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model = CoLM(cfg, dtype=dtype or next(iter(loaded.values())).dtype)
    model.load_state_dict(loaded, strict=True)
    return model
