"""Weights from checkpoints of the original models: the vision tower of a Qwen2-VL / Qwen2.5-VL (``visual.*``) or
SigLIP checkpoint, and any Hugging Face causal LM as the language model."""
import json
import os
from pathlib import Path

import torch

from .configuration import FastVLVisionConfig

_QWEN = ("qwen2_vl", "qwen2_5_vl")
_SIGLIP = ("siglip", "siglip_vision_model")
# config.json fields that describe the file rather than the model
CONFIG_META = ("model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path")


def read_config(path):
    """The config.json of the checkpoint directory ``path`` as a dict."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory")
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no config.json")
    try:
        return json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not a JSON config ({exc})") from None


def _qwen_vision(path, raw):
    """transformers' vision config of a Qwen2-VL / Qwen2.5-VL checkpoint (fields it omits take their defaults),
    or of a directory holding only a Qwen2-VL vision tower (SliMM's ``custom_visual_model``)."""
    from transformers import AutoConfig
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

    if "vision_config" in raw:
        return AutoConfig.from_pretrained(path).vision_config
    cls = Qwen2VLVisionConfig if raw["model_type"] == "qwen2_vl" else Qwen2_5_VLVisionConfig
    return cls(**{k: v for k, v in raw.items() if k not in CONFIG_META})


def vision_config_from_hf(path, **overrides):
    """The FastVLVisionConfig of the vision tower of the checkpoint directory ``path`` (a Qwen2-VL or Qwen2.5-VL
    model or vision tower, or a SigLIP model).

    SigLIP towers keep all but their last layer by default (the penultimate-layer features LLaVA and
    FlashSloth use); pass ``depth=`` to change it.
    """
    raw = read_config(path)
    kind = raw.get("model_type")
    if kind in _QWEN:
        v = _qwen_vision(path, raw)
        common = dict(
            tower="native", depth=v.depth, num_heads=v.num_heads, hidden_act=v.hidden_act, patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
            in_channels=v.in_channels,
        )
        if kind == "qwen2_vl":
            fields = dict(embed_dim=v.embed_dim, intermediate_size=int(v.embed_dim * v.mlp_ratio))
        else:
            fields = dict(
                embed_dim=v.hidden_size, intermediate_size=v.intermediate_size, mlp_type="swiglu",
                norm="rmsnorm", window_size=v.window_size, fullatt_block_indexes=v.fullatt_block_indexes,
            )
        return FastVLVisionConfig(**{**common, **fields, **overrides})
    if kind in _SIGLIP:
        v = raw.get("vision_config", raw) if kind == "siglip" else raw
        fields = dict(
            tower="fixed", depth=v["num_hidden_layers"] - 1, embed_dim=v["hidden_size"],
            num_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
            hidden_act=v["hidden_act"], norm_eps=v.get("layer_norm_eps", 1e-6), image_size=v["image_size"],
            patch_size=v["patch_size"], in_channels=v.get("num_channels", 3),
        )
        return FastVLVisionConfig(**{**fields, **overrides})
    raise ValueError(f"{path}: model_type {kind!r} is not a supported vision checkpoint ({_QWEN + _SIGLIP})")


def read_state_dict(path):
    """Every tensor of the ``*.safetensors`` (else ``pytorch_model*.bin``) files of ``path``."""
    files = sorted(Path(path).glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        return {k: v for f in files for k, v in load_file(f).items()}
    files = sorted(Path(path).glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
    return {k: v for f in files for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}


def _strip(state, prefixes):
    for prefix in prefixes:
        found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if found:
            return found
    return {}


def qwen_vision_names(state, depth):
    """(FastVL name -> tensor, ignored checkpoint keys) for Qwen2-VL's ``visual`` state dict."""
    out, ignored = {}, []
    for key, value in state.items():
        if key == "patch_embed.proj.weight":  # the Conv3d with stride = kernel is a Linear over each pixel row
            out["vision_tower.patch_embed.weight"] = value.reshape(value.shape[0], -1)
        elif key.startswith("blocks.") and int(key.split(".")[1]) < depth:
            out["vision_tower." + key] = value
        elif key.startswith("merger."):
            out["compressor." + key] = value
        else:
            ignored.append(key)
    return out, ignored


_SIGLIP_LAYER = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
                 "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def siglip_vision_names(state, depth):
    """(FastVL name -> tensor, ignored checkpoint keys) for a SigLIP ``vision_model`` state dict."""
    out, ignored, qkv = {}, [], {}
    for key, value in state.items():
        if key == "embeddings.patch_embedding.weight":
            out["vision_tower.patch_embed.weight"] = value.reshape(value.shape[0], -1)
        elif key == "embeddings.patch_embedding.bias":
            out["vision_tower.patch_embed.bias"] = value
        elif key == "embeddings.position_embedding.weight":
            out["vision_tower.position_embedding.weight"] = value
        elif key.startswith("encoder.layers.") and int(key.split(".")[2]) < depth:
            layer, name = key.split(".")[2], ".".join(key.split(".")[3:])
            module, param = name.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, param), {})[module.split(".")[1][0]] = value
            elif module in _SIGLIP_LAYER:
                out[f"vision_tower.blocks.{layer}.{_SIGLIP_LAYER[module]}.{param}"] = value
            else:
                ignored.append(key)
        else:
            ignored.append(key)
    for (layer, param), parts in qkv.items():
        out[f"vision_tower.blocks.{layer}.attn.qkv.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out, ignored


def load_vision_weights(model, path):
    """Copy the vision tower (and, for Qwen2-VL, the merger when the compressor has one of that shape)
    of the checkpoint directory ``path`` into ``model`` (a FastVLForConditionalGeneration).

    Raises ValueError when a tower parameter is missing or has another shape; returns the checkpoint
    keys left unused (e.g. SigLIP's last layer, post-norm and head).
    """
    kind = read_config(path).get("model_type")
    state = read_state_dict(path)
    depth = model.config.vision_config.depth
    if kind in _QWEN:
        names, ignored = qwen_vision_names(_strip(state, ("model.visual.", "visual.", "")), depth)
    elif kind in _SIGLIP:
        names, ignored = siglip_vision_names(_strip(state, ("vision_model.", "")), depth)
    else:
        raise ValueError(f"{path}: model_type {kind!r} is not a supported vision checkpoint ({_QWEN + _SIGLIP})")
    params = dict(model.named_parameters())
    tower = {k for k in params if k.startswith("vision_tower.")}
    missing = sorted(tower - names.keys())
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} vision tower parameters, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, value in names.items():
            if name not in params or params[name].shape != value.shape:
                if name.startswith("vision_tower."):
                    got = None if name not in params else list(params[name].shape)
                    raise ValueError(f"{path}: {name} has shape {list(value.shape)}, the model expects {got}")
                ignored.append(name)  # a merger the compressor does not have (or of another width)
                continue
            params[name].copy_(value)
    return ignored


def key_listing(names, limit=8):
    """The first ``limit`` of ``names``, sorted, and how many more there are."""
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_language_weights(model, path):
    """Load the Hugging Face causal LM checkpoint directory ``path`` (Qwen2, Phi, Llama, ...) into
    ``model.language_model`` of a FastVLForConditionalGeneration built with that LLM's config.

    transformers reads the checkpoint (any of its formats, tied embeddings included); a key the checkpoint lacks,
    one it has that the LLM does not, or one of another shape is a ValueError that lists them.
    """
    from transformers import AutoModelForCausalLM

    read_config(path)
    dtype = next(model.language_model.parameters()).dtype
    llm, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    info["mismatched_keys"] = [key for key, *_ in info.get("mismatched_keys") or ()]  # (key, shapes...)
    problems = [f"{kind.replace('_', ' ')}: {key_listing(info[kind])}"
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(kind)]
    if problems:
        raise ValueError(f"{path}: the checkpoint does not match its own config ({'; '.join(problems)})")
    ours, theirs = model.language_model.state_dict(), llm.state_dict()
    missing, unexpected = ours.keys() - theirs.keys(), theirs.keys() - ours.keys()
    shapes = [k for k in ours.keys() & theirs.keys() if ours[k].shape != theirs[k].shape]
    if missing or unexpected or shapes:
        problems = [f"{what}: {key_listing(keys)}" for what, keys in (
            ("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if keys]
        raise ValueError(f"{path}: its {type(llm).__name__} does not fit the model's language model "
                         f"{type(model.language_model).__name__} ({'; '.join(problems)})")
    model.language_model.load_state_dict(theirs)
