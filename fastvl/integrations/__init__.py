"""Drop-in fastvl for Hugging Face transformers models: ``fastvl.patch(model)``.

transformers is imported on first use, not with fastvl.
"""

TEXT_ATTENTION = "_fastvl_text_attention"  # where patch() keeps the language model's previous implementation


def patch(model, *, text_attention=False):
    """Run the vision tower of a Qwen2-VL / Qwen2.5-VL model on the fastvl ops; returns ``model``.

    ``model``: a ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``, their
    inner ``*Model``, or the vision tower itself. Every vision block's attention becomes one
    ``varlen_attention`` call with the 2D RoPE fused (Qwen2.5-VL windows are more segments), the
    merger one ``patch_merge``; the packing is computed once per forward from ``grid_thw``.
    Weights are shared, not copied. ``text_attention=True`` also switches the language model to the
    ``"fastvl"`` attention implementation (see ``fastvl.integrations.attention``).
    Idempotent; ``unpatch`` reverts it.
    """
    from . import attention, qwen2_vl

    tower = _tower(model, qwen2_vl.TOWERS)
    attention.register()
    if text_attention:
        if tower is model:
            raise TypeError("model: text_attention=True needs the full model, got only its vision tower")
        if model.config.text_config._attn_implementation != attention.NAME:
            setattr(model, TEXT_ATTENTION, model.config.text_config._attn_implementation)
            model.set_attn_implementation({"text_config": attention.NAME})
    qwen2_vl.patch_tower(tower)
    return model


def unpatch(model):
    """Undo ``patch``: the transformers forwards (and the previous text attention) again; returns ``model``."""
    from . import qwen2_vl

    qwen2_vl.unpatch_tower(_tower(model, qwen2_vl.TOWERS))
    previous = model.__dict__.pop(TEXT_ATTENTION, None)
    if previous is not None:
        model.set_attn_implementation({"text_config": previous})
    return model


def is_patched(model) -> bool:
    from . import qwen2_vl

    return qwen2_vl.is_patched(_tower(model, qwen2_vl.TOWERS))


def register_attention():
    """Register ``attn_implementation="fastvl"`` with transformers (``patch`` does it too)."""
    from . import attention

    attention.register()


def _tower(model, towers):
    inner = getattr(model, "model", None)
    for candidate in (model, getattr(model, "visual", None), getattr(inner, "visual", None)):
        if type(candidate) in towers:
            return candidate
    raise TypeError(
        "model must be a transformers Qwen2-VL or Qwen2.5-VL model (ForConditionalGeneration, Model or its "
        f"vision tower), got {type(model).__name__}"
    )
