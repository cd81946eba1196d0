"""Engines: one interface over plain/DDP/FSDP2 (torch) and DeepSpeed ZeRO for the training loop.

``backward(batch, num_items, last)`` runs one micro-batch and returns its share of the step loss; ``step()``
clips, updates and returns the gradient norm; ``save``/``load`` write and read the model, optimizer and
scheduler of a checkpoint directory (every rank calls them); ``full_state_dict()`` gathers the weights for the
final ``save_pretrained`` (on rank 0). Optimizer groups (``model.param_groups``) are made after the wrapping:
FSDP2 replaces the parameters by sharded DTensors.

The loss of a micro-batch is its summed token cross-entropy divided by ``num_items``, the supervised tokens of
the whole step on all ranks: the step's gradient is that of the mean over every supervised token, whatever the
batch sizes, padding or skipped records. DDP, FSDP2 and ZeRO average gradients over ranks, so each rank scales
its loss by the world size.
"""
import contextlib
import json
import os

import torch
import torch.distributed as dist

from .model import param_groups

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "position_ids",
                "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
CONFIGS = os.path.join(os.path.dirname(__file__), "configs")


def model_inputs(batch, device):
    """The model's inputs on ``device``; the lm_head runs on the supervised positions only."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    return {"use_cache": False, "logits_to_keep": "supervised",
            **{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}}


class TorchEngine:
    """A plain module (one process), DDP, or FSDP2 (``fsdp_mode``); AdamW and the scheduler are ours; checkpoints
    through torch.distributed.checkpoint (sharded for FSDP2)."""

    def __init__(self, model, args, scheduler_fn, device, world, fsdp_mode=None):
        self.device, self.world, self.args = device, world, args
        self.module = model.to(device)
        self.fsdp = fsdp_mode is not None
        self.autocast = args.bf16 and not self.fsdp
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh(device.type, (world,))
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 \
                else MixedPrecisionPolicy()
            kwargs = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=fsdp_mode == "full_shard")
            for block in [*model.vision_tower.blocks, *model.get_decoder().layers]:
                fully_shard(block, **kwargs)
            fully_shard(model, **kwargs)
            self.wrapped = model
        elif world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            self.wrapped = model
        groups = param_groups(model, args)
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        self.scheduler = scheduler_fn(self.optimizer)

    def _sync(self, last):
        if self.fsdp:
            self.wrapped.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if self.world > 1 and not last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def backward(self, batch, num_items, last):
        with self._sync(last), torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            loss = self.wrapped(**model_inputs(batch, self.device), num_items_in_batch=num_items).loss
            (loss * self.world).backward()
        return loss.detach()

    def step(self):
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.args.max_grad_norm or float("inf"))
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lrs(self):
        return {g["part"]: g["lr"] for g in self.optimizer.param_groups}

    def _state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(self.wrapped, self.optimizer)
        return {"model": model, "optimizer": optimizer}

    def save(self, path):
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=os.path.join(path, "state"))
        if not dist.is_initialized() or dist.get_rank() == 0:
            torch.save(self.scheduler.state_dict(), os.path.join(path, "scheduler.pt"))

    def load(self, path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=os.path.join(path, "state"))
        set_state_dict(self.wrapped, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        self.scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=False))

    def full_state_dict(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=self.fsdp,
                                                                           cpu_offload=True))


def deepspeed_config(path, args, world, hidden_size):
    """The DeepSpeed JSON ``path`` (or the shipped ``zero2``/``zero3``) with its ``"auto"`` values filled from the
    arguments, as HF Trainer fills them."""
    if path in ("zero2", "zero3"):
        path = os.path.join(CONFIGS, f"{path}.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--deepspeed: cannot read {path!r} ({e})") from e
    if "scheduler" in config:
        raise ValueError(f"--deepspeed {path}: drop its 'scheduler' (the schedule is --lr_scheduler_type)")
    auto = {
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
        "gradient_clipping": args.max_grad_norm,
        "bf16.enabled": args.bf16, "fp16.enabled": False,
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }

    def fill(node, prefix):
        for key, value in node.items():
            name = prefix + key
            if isinstance(value, dict):
                fill(value, name + ".")
            elif value == "auto":
                if name not in auto:
                    raise ValueError(f"--deepspeed {path}: cannot fill {name!r}: 'auto' (give a value)")
                node[key] = auto[name]

    fill(config, "")
    for name in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if config.setdefault(name, auto[name]) != auto[name]:  # the file and the flags must agree
            raise ValueError(f"--deepspeed {path}: {name}={config[name]} but the arguments give {auto[name]}")
    if config.get("bf16", {}).get("enabled", False) != args.bf16:
        raise ValueError(f"--deepspeed {path}: bf16.enabled={config['bf16']['enabled']} but --bf16 is {args.bf16}")
    return config


class DeepSpeedEngine:
    """DeepSpeed ZeRO (stage from the JSON); our AdamW param groups (DeepSpeed's own optimizer when the JSON has
    one) and scheduler, which DeepSpeed steps and checkpoints."""

    def __init__(self, model, args, scheduler_fn, device, world):
        import deepspeed

        self.device, self.world = device, world
        config = deepspeed_config(args.deepspeed, args, world, model.config.text_config.hidden_size)
        groups = param_groups(model, args)
        optimizer = None
        if "optimizer" not in config:
            optimizer = torch.optim.AdamW(groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        elif device.type == "cpu":
            config["optimizer"].setdefault("params", {})["torch_adam"] = True  # DeepSpeed's fused Adam needs CUDA
        self.stage = config.get("zero_optimization", {}).get("stage", 0)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=groups, optimizer=optimizer, lr_scheduler=scheduler_fn, config=config)
        self.module = self.engine.module
        self.parts = [g["part"] for g in groups]

    def backward(self, batch, num_items, last):
        loss = self.engine(**model_inputs(batch, self.device), num_items_in_batch=num_items).loss
        self.engine.backward(loss * self.world, scale_wrt_gas=False)
        self.engine.step()  # DeepSpeed updates at the accumulation boundary only
        return loss.detach()

    def step(self):
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lrs(self):
        return dict(zip(self.parts, self.scheduler.get_last_lr()))

    def save(self, path):
        self.engine.save_checkpoint(path, tag="deepspeed")

    def load(self, path):
        load_path, _ = self.engine.load_checkpoint(path, tag="deepspeed", load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise ValueError(f"{path}: no DeepSpeed checkpoint")

    def full_state_dict(self):
        import deepspeed

        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.stage == 3):
            return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
