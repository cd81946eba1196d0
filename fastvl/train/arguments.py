"""Training arguments: the flag names of HF Trainer / FlashSloth / SliMM scripts, from the command line or YAML.

``parse_args(["config.yaml", "--learning_rate", "1e-4"])``: a first argument ending in ``.yaml``/``.yml`` is a
mapping of these fields; flags after it override it. Booleans take ``--bf16`` or ``--bf16 True`` (HF style).
"""
import dataclasses
import math
import os
from dataclasses import dataclass, field

from ..models.configuration import TEMPLATES

PARTS = ("vision", "projector", "embq", "llm")
# SliMM's --mm_tunable_parts names
_SLIMM_PARTS = {"mm_vision_tower": "vision", "mm_mlp_adapter": "projector", "mm_language_model": "llm"}
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
FSDP_MODES = ("full_shard", "shard_grad_op")


USAGE = """fastvl train [config.yaml] [--nproc_per_node N] [--FLAG VALUE ...]
       fastvl train --demo DIR [--nproc_per_node N] [--FLAG VALUE ...]
       torchrun --nproc_per_node N -m fastvl.train [config.yaml] [--FLAG VALUE ...]"""


def _arg(default, help, **metadata):
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class TrainArguments:
    # model: a saved FastVL model, or one assembled from a vision checkpoint and a language model
    model_name_or_path: str | None = _arg(None, "a saved FastVL model directory (with its tokenizer)")
    vision_tower: str | None = _arg(None, "Qwen2-VL / Qwen2.5-VL / SigLIP checkpoint directory (new model)")
    language_model: str | None = _arg(None, "causal LM checkpoint directory with its tokenizer (new model)")
    compressor: str = _arg("patch_merge", "new model: none | patch_merge | sap | deepstack")
    deepstack_type: str = _arg("midlayers", "new model: midlayers | efficient")
    use_embq: bool = _arg(False, "new model: FlashSloth's embedded queries")
    num_query_tokens: int = _arg(9, "new model: EmbQ queries per question")
    embq_layer: int = _arg(7, "new model: LLM layer whose input EmbQ rewrites")
    image_hd: bool = _arg(False, "new model with a fixed tower: 5 crops per image (FlashSloth-HD)")
    template: str | None = _arg(None, "qwen2 | phi2 | plain (FlashSloth's --version); default: the model's",
                                aliases=["--version"])
    min_pixels: int | None = _arg(None, "native tower: smallest image area after resizing")
    max_pixels: int | None = _arg(None, "native tower: largest image area after resizing")
    # data
    data_path: str | None = _arg(None, "LLaVA .json/.jsonl, or a YAML list of datasets (SliMM)")
    image_folder: str | None = _arg(None, "directory the records' image paths are relative to")
    model_max_length: int = _arg(2048, "records with more tokens are skipped (and counted)")
    dataloader_num_workers: int = _arg(2, "DataLoader worker processes per rank (0: load in the training process)")
    max_bad_fraction: float = _arg(0.05, "stop when more than this fraction of the records seen were skipped")
    # optimisation
    output_dir: str | None = _arg(None, "checkpoints, metrics and the final model")
    tune_parts: str | None = _arg(None, f"comma-separated parts to train among {', '.join(PARTS)} "
                                  "(default: all but the vision tower)", aliases=["--mm_tunable_parts"])
    per_device_train_batch_size: int = _arg(8, "samples per rank and micro-batch (unused with --packing)")
    packing: bool = _arg(False, "micro-batches of --max_tokens_per_batch LLM tokens, samples packed without padding")
    max_tokens_per_batch: int | None = _arg(None, "with --packing: LLM tokens per micro-batch (>= model_max_length)")
    max_patches_per_batch: int | None = _arg(None, "with --packing: ViT patches per micro-batch at most (a sample "
                                             "above it alone forms one); default: no limit")
    packing_window: int = _arg(2048, "with --packing: records packed together, from each epoch's shuffled order")
    gradient_accumulation_steps: int = _arg(1, "micro-batches per optimizer step")
    learning_rate: float = _arg(5e-5, "peak learning rate (LLM, EmbQ, and parts without their own)")
    mm_projector_lr: float | None = _arg(None, "learning rate of the projector/compressor")
    mm_vision_tower_lr: float | None = _arg(None, "learning rate of the vision tower")
    weight_decay: float = _arg(0.0, "AdamW weight decay (not on biases and norms)")
    adam_beta1: float = _arg(0.9, "AdamW beta1")
    adam_beta2: float = _arg(0.999, "AdamW beta2")
    adam_epsilon: float = _arg(1e-8, "AdamW epsilon")
    max_grad_norm: float = _arg(1.0, "gradient clipping (0: none)")
    lr_scheduler_type: str = _arg("linear", " | ".join(SCHEDULERS))
    warmup_ratio: float = _arg(0.0, "fraction of the steps spent warming up")
    warmup_steps: int = _arg(0, "warm-up steps (overrides warmup_ratio)")
    num_train_epochs: float = _arg(3.0, "epochs (ignored when max_steps > 0)")
    max_steps: int = _arg(-1, "optimizer steps in all")
    seed: int = _arg(42, "model init, data order, dropout")
    bf16: bool = _arg(False, "bfloat16 compute (autocast, FSDP2 mixed precision, DeepSpeed bf16)")
    gradient_checkpointing: bool = _arg(False, "recompute activations in the backward (non-reentrant)")
    # engines, checkpoints, logging
    deepspeed: str | None = _arg(None, "DeepSpeed JSON config (ZeRO-2/3); 'zero2'/'zero3' name the shipped ones")
    fsdp: str = _arg("", "PyTorch FSDP2: full_shard (default when given) or shard_grad_op", nargs="?",
                     const="full_shard")
    save_steps: int = _arg(500, "checkpoint every N optimizer steps (0: only at the end)")
    save_total_limit: int | None = _arg(None, "keep at most N checkpoints")
    logging_steps: int = _arg(10, "one metrics line every N steps")
    resume: bool = _arg(False, "continue from the newest complete checkpoint in output_dir")

    @property
    def parts(self):
        """The parts to train, or None for the default."""
        if self.tune_parts is None:
            return None
        return [_SLIMM_PARTS.get(p.strip(), p.strip()) for p in self.tune_parts.split(",") if p.strip()]

    @property
    def fsdp_mode(self):
        modes = [w for w in self.fsdp.split() if w != "auto_wrap"]  # HF's "full_shard auto_wrap": we always wrap
        return modes[0] if modes else ("full_shard" if self.fsdp.strip() else None)

    def validate(self):
        def need(name, ok, what):
            if not ok:
                raise ValueError(f"--{name} {what}, got {getattr(self, name)!r}")

        need("output_dir", self.output_dir, "is required")
        need("data_path", self.data_path, "is required")
        new = self.vision_tower or self.language_model
        if bool(self.model_name_or_path) == bool(new):
            raise ValueError("give either --model_name_or_path (a saved FastVL model) or --vision_tower and "
                             "--language_model (a new model)")
        if new and not (self.vision_tower and self.language_model):
            raise ValueError("a new model needs both --vision_tower and --language_model")
        parts = self.parts
        need("tune_parts", parts is None or (parts and set(parts) <= set(PARTS)), f"must list parts among {PARTS}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "model_max_length",
                     "logging_steps"):
            need(name, getattr(self, name) > 0, "must be positive")
        if self.packing:
            need("max_tokens_per_batch", self.max_tokens_per_batch is not None
                 and self.max_tokens_per_batch >= self.model_max_length,
                 f"is required with --packing and must be at least --model_max_length ({self.model_max_length})")
            need("max_patches_per_batch", self.max_patches_per_batch is None or self.max_patches_per_batch > 0,
                 "must be positive")
            need("packing_window", self.packing_window > 0, "must be positive")
        else:
            for name in ("max_tokens_per_batch", "max_patches_per_batch"):
                need(name, getattr(self, name) is None, "needs --packing")
        for name in ("dataloader_num_workers", "save_steps", "warmup_steps"):
            need(name, getattr(self, name) >= 0, "must not be negative")
        for name in ("learning_rate", "mm_projector_lr", "mm_vision_tower_lr", "weight_decay", "max_grad_norm",
                     "adam_epsilon"):
            value = getattr(self, name)
            need(name, value is None or (math.isfinite(value) and value >= 0), "must be finite and >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            need(name, 0 <= getattr(self, name) < 1, "must lie in [0, 1)")
        need("warmup_ratio", 0 <= self.warmup_ratio <= 1, "must lie in [0, 1]")
        need("max_bad_fraction", 0 <= self.max_bad_fraction <= 1, "must lie in [0, 1]")
        need("num_train_epochs", self.max_steps > 0 or (math.isfinite(self.num_train_epochs)
                                                         and self.num_train_epochs > 0),
             "must be positive (or give --max_steps)")
        need("save_total_limit", self.save_total_limit is None or self.save_total_limit > 0, "must be positive")
        need("template", self.template in (None, *TEMPLATES), f"must be one of {TEMPLATES}")
        need("lr_scheduler_type", self.lr_scheduler_type in SCHEDULERS, f"must be one of {SCHEDULERS}")
        need("fsdp", not self.fsdp.strip() or self.fsdp_mode in FSDP_MODES,
             f"must be one of {FSDP_MODES} (optionally with auto_wrap)")
        if self.fsdp.strip() and self.deepspeed:
            raise ValueError("--fsdp and --deepspeed exclude each other")
        for name in ("data_path", "image_folder", "model_name_or_path", "vision_tower", "language_model"):
            path = getattr(self, name)
            need(name, path is None or os.path.exists(path), "does not exist")
        return self


def parse_args(argv):
    """TrainArguments from ``argv`` (a YAML file first, then flags that override it); ValueError on bad values."""
    import yaml
    from transformers import HfArgumentParser

    parser = HfArgumentParser(TrainArguments, prog="fastvl train", usage=USAGE)
    argv = list(argv)
    if argv and argv[0].endswith((".yaml", ".yml")):
        path = argv.pop(0)
        try:
            with open(path) as f:
                config = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"{path}: cannot read the YAML config ({e})") from e
        if not isinstance(config, dict):
            raise ValueError(f"{path}: a YAML config is a mapping of argument names to values")
        names = {f.name for f in dataclasses.fields(TrainArguments)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"{path}: unknown arguments {unknown}")
        parser.set_defaults(**config)
    (args,) = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    return args.validate()
