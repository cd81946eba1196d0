"""The FastVL model: vision towers, compressors, projector, EmbQ, DeepStack, and an HF causal LM.

Registered with transformers' Auto classes (``AutoConfig``, ``AutoModelForCausalLM``,
``AutoModelForImageTextToText``) when this package is imported.
"""
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from .configuration import FastVLConfig, FastVLVisionConfig
from .convert import convert, save_converted
from .generate import generate_text, image_processor, load_tokenizer, prepare_inputs
from .loading import load_language_weights, load_vision_weights, vision_config_from_hf
from .modeling import FastVLForConditionalGeneration, FastVLPreTrainedModel

AutoConfig.register(FastVLConfig.model_type, FastVLConfig, exist_ok=True)
AutoConfig.register(FastVLVisionConfig.model_type, FastVLVisionConfig, exist_ok=True)
AutoModelForCausalLM.register(FastVLConfig, FastVLForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(FastVLConfig, FastVLForConditionalGeneration, exist_ok=True)

__all__ = [
    "FastVLConfig", "FastVLForConditionalGeneration", "FastVLPreTrainedModel", "FastVLVisionConfig", "convert",
    "generate_text", "image_processor", "load_language_weights", "load_tokenizer", "load_vision_weights",
    "prepare_inputs", "save_converted", "vision_config_from_hf",
]
