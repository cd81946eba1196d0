"""The training loop: one process per rank (torchrun), DDP / FSDP2 / DeepSpeed ZeRO, exact resume."""
import json
import math
import os
import resource
import socket
import sys
import time

import torch
import torch.distributed as dist

from ..data import CAUSES
from . import checkpoint
from .data import (PackedBatches, ResumableSampler, SkippingDataset, TrainCollator, build_dataset, filler_sample,
                   sample_sizes)
from .engine import DeepSpeedEngine, TorchEngine
from .model import build_model, data_settings, freeze

MIN_RECORDS = 100  # max_bad_fraction is judged over at least this many records (or the whole dataset)
SHOWN_BAD = 5  # bad records each rank names in its log and in the stop message


class BadDataError(RuntimeError):
    """More records were skipped than --max_bad_fraction allows."""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(args):
    """(rank, world size, device). Under torchrun: a process group (NCCL on GPUs, gloo on CPU); one process with
    an engine that needs a group (DeepSpeed, FSDP2): a group of one; otherwise none."""
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ and (args.deepspeed or args.fsdp_mode):
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if "RANK" not in os.environ:
        return 0, 1, device
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _all_reduce(tensor, op=None):
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def _seed(seed):
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Reporter:
    """Rank 0's outputs: tqdm bar, metrics.jsonl, TensorBoard (when installed), summary and loss curve."""

    def __init__(self, args, rank, total_steps, start_step):
        self.rank, self.dir = rank, args.output_dir
        self.metrics = os.path.join(self.dir, "metrics.jsonl")
        self.bar = self.writer = None
        if rank:
            return
        from tqdm.auto import tqdm

        kept = []
        if start_step and os.path.isfile(self.metrics):  # lines after the checkpoint are logged again
            with open(self.metrics) as f:
                kept = [line for line in f if json.loads(line)["step"] <= start_step]
        with open(self.metrics, "w") as f:
            f.writelines(kept)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(self.dir, "runs"),
                                        purge_step=start_step + 1 if start_step else None)
        except ImportError:
            pass
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, mininterval=1)

    def say(self, message):
        if self.rank == 0:
            (self.bar.write if self.bar is not None else print)(message, file=sys.stderr)

    def step(self, record):
        if self.rank:
            return
        self.bar.update(record["step"] - self.bar.n)
        if "loss" not in record:
            return
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        if self.writer is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s"):
                self.writer.add_scalar(f"train/{key}", record[key], record["step"])

    def finish(self, summary):
        if self.rank:
            return
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
        with open(os.path.join(self.dir, "train_summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        plot_loss(self.metrics, os.path.join(self.dir, "loss_curve.png"))


def plot_loss(metrics, png):
    """The loss curve of a metrics.jsonl as a PNG (nothing without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    with open(metrics) as f:
        rows = [json.loads(line) for line in f]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="step", ylabel="loss (mean per supervised token)", title="training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def _stop_for_bad_data(first_bad, totals, seen, args):
    gathered = [first_bad]
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, first_bad)
    examples = "\n".join(f"  [{cause}] {message}" for rank_bad in gathered for cause, message in rank_bad)
    counts = ", ".join(f"{c} {n}" for c, n in totals["skipped"].items() if n)
    return BadDataError(f"{sum(totals['skipped'].values())} of {seen} records skipped ({counts}), more than "
                        f"--max_bad_fraction {args.max_bad_fraction}; the first ones:\n{examples}")


def train(args):
    """Runs a whole training (every rank calls it); returns the summary."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork
    rank, world, device = setup_distributed(args)
    try:
        return _train(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(args, rank, world, device):
    began = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    found = checkpoint.checkpoints(args.output_dir)
    if found and not args.resume:
        raise ValueError(f"output_dir: {args.output_dir!r} holds checkpoints; pass --resume to continue from "
                         f"{os.path.basename(found[-1])}, or choose another output_dir")
    _seed(args.seed)
    model, tokenizer = build_model(args)
    processor, image_tokens, queries = data_settings(model, args)
    dataset = build_dataset(args.data_path, args.image_folder, args.seed, tokenizer=tokenizer, processor=processor,
                            template=model.config.chat_template, num_image_tokens=image_tokens,
                            num_query_tokens=queries, max_length=args.model_max_length)
    filler = filler_sample(processor, image_tokens, model.config.image_token_id, tokenizer.pad_token_id,
                           model.config.query_token_id, queries)
    if args.packing:  # the LLM attends within each packed sample
        from ..integrations import register_attention

        register_attention()
        model.set_attn_implementation({"text_config": "fastvl"})
        sampler = PackedBatches(sample_sizes(dataset, image_tokens.vit_patches, rank, world,
                                             args.dataloader_num_workers),
                                world, rank, args.seed, args.max_tokens_per_batch, args.max_patches_per_batch,
                                args.packing_window)
        micro_batches = sampler.num_batches
    else:
        sampler = ResumableSampler(dataset, world, rank, args.seed)
        micro_batches = lambda epoch: sampler.num_samples // args.per_device_train_batch_size  # noqa: E731

    def steps_in(epoch):
        steps = micro_batches(epoch) // args.gradient_accumulation_steps
        if steps == 0:
            raise ValueError(f"data_path: {len(dataset)} records give {micro_batches(epoch)} micro-batches per rank "
                             f"in epoch {epoch}, less than one step of {args.gradient_accumulation_steps}")
        return steps

    def locate(step):
        """(epoch, steps done in it) of a global step count."""
        epoch = 0
        while step >= steps_in(epoch):
            step -= steps_in(epoch)
            epoch += 1
        return epoch, step

    def epochs(step):
        epoch, done = locate(step)
        return round(epoch + done / steps_in(epoch), 4)

    if args.max_steps > 0:
        total_steps = args.max_steps
    else:
        full = int(args.num_train_epochs)
        total_steps = sum(steps_in(e) for e in range(full))
        total_steps += math.ceil((args.num_train_epochs - full) * steps_in(full)) if args.num_train_epochs > full else 0
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)

    model.train()
    parts = freeze(model, args.parts)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters()) - trainable

    def scheduler(optimizer):
        from transformers import get_scheduler

        return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    if args.deepspeed:
        engine = DeepSpeedEngine(model, args, scheduler, device, world)
    else:
        engine = TorchEngine(model, args, scheduler, device, world, args.fsdp_mode)

    totals = {"samples": 0, "tokens": 0, "skipped": dict.fromkeys(CAUSES, 0), "wall_time_s": 0.0}
    step = 0
    if rank == 0:
        checkpoint.remove_partial(args.output_dir)
    # what the data position depends on; checkpoints written without packing lack its keys
    layout = {"world_size": world, "per_device_train_batch_size": args.per_device_train_batch_size,
              "gradient_accumulation_steps": args.gradient_accumulation_steps, "seed": args.seed,
              "packing": args.packing, "max_tokens_per_batch": args.max_tokens_per_batch,
              "max_patches_per_batch": args.max_patches_per_batch, "packing_window": args.packing_window}
    unpacked = {"packing": False, "max_tokens_per_batch": None, "max_patches_per_batch": None, "packing_window": 2048}
    if found:
        state = checkpoint.load(found[-1], engine)
        differ = {k: (state.get(k, unpacked.get(k)), v) for k, v in layout.items()
                  if state.get(k, unpacked.get(k)) != v}
        if differ:
            raise ValueError(f"--resume: {found[-1]} was written with other settings (saved, now): {differ}; the "
                             "data position depends on them")
        step, totals = state["step"], state["totals"]
    report = Reporter(args, rank, total_steps, step)
    if found:
        report.say(f"resumed from {found[-1]} (step {step})")
    report.say(f"{world} rank(s), {type(engine).__name__}{' ' + args.fsdp_mode if args.fsdp_mode else ''}; "
               f"{len(dataset)} records, {steps_in(0)} steps in epoch 0, {total_steps} steps"
               f"{f', packed to {args.max_tokens_per_batch} tokens per micro-batch' if args.packing else ''}; trainable "
               f"{trainable:,} parameters ({', '.join(parts)}), frozen {frozen:,}")

    collator = TrainCollator(tokenizer, filler, packed=args.packing)
    first_bad = []  # (cause, message) of this rank's first SHOWN_BAD skipped records
    window = {"loss": torch.zeros((), dtype=torch.float64, device=device), "steps": 0, "samples": 0, "tokens": 0,
              "padding": 0, "slots": 0, "start": time.time()}
    last_loss = None
    while step < total_steps:
        epoch, in_epoch = locate(step)
        end = step - in_epoch + steps_in(epoch)
        skip = in_epoch * args.gradient_accumulation_steps  # micro-batches of this epoch already trained on
        if args.packing:
            sampler.set_epoch(epoch, skip)
            batching = dict(batch_sampler=sampler)
        else:
            sampler.set_epoch(epoch, skip * args.per_device_train_batch_size)
            batching = dict(batch_size=args.per_device_train_batch_size, sampler=sampler, drop_last=True)
        loader = torch.utils.data.DataLoader(
            SkippingDataset(dataset), collate_fn=collator, num_workers=args.dataloader_num_workers,
            generator=torch.Generator().manual_seed(args.seed + epoch), **batching)
        batches = iter(loader)
        while step < min(total_steps, end):
            micro = [next(batches) for _ in range(args.gradient_accumulation_steps)]
            for b in micro:
                for cause, message in b["skipped"][:SHOWN_BAD - len(first_bad)]:
                    print(f"[rank {rank}] skipped: {message}", file=sys.stderr)
                    first_bad.append((cause, message))
            keys = ("num_items", "num_samples", "num_tokens", "num_padding", "num_slots")
            counts = torch.tensor([sum(b[k] for b in micro) for k in keys]
                                  + [sum(c == cause for b in micro for c, _ in b["skipped"]) for cause in CAUSES],
                                  dtype=torch.int64)
            counts = _all_reduce(counts.to(device)).tolist()
            num_items = max(counts[0], 1)  # a step without a supervised token: zero loss, zero gradient
            for i, b in enumerate(micro):
                window["loss"] += engine.backward(b, num_items, i == len(micro) - 1).double()
            grad_norm = engine.step()
            step += 1
            totals["samples"] += counts[1]
            totals["tokens"] += counts[2]
            for cause, n in zip(CAUSES, counts[len(keys):]):
                totals["skipped"][cause] += n
            window["steps"] += 1
            for name, n in zip(("samples", "tokens", "padding", "slots"), counts[1:len(keys)]):
                window[name] += n

            bad = sum(totals["skipped"].values())
            seen = totals["samples"] + bad
            if bad > args.max_bad_fraction * max(seen, min(MIN_RECORDS, len(dataset))):
                raise _stop_for_bad_data(first_bad, totals, seen, args)
            record = {"step": step}
            if step % args.logging_steps == 0 or step == total_steps:
                elapsed = max(time.time() - window["start"], 1e-9)
                last_loss = float(_all_reduce(window["loss"])) / window["steps"]
                lrs = engine.lrs
                record.update(epoch=epochs(step), loss=last_loss,
                              lr=lrs.get("llm", next(iter(lrs.values()))), lrs=lrs, grad_norm=grad_norm,
                              tokens_per_s=window["tokens"] / elapsed, samples_per_s=window["samples"] / elapsed,
                              padding_fraction=window["padding"] / max(window["slots"], 1), skipped=bad)
                if bad:
                    report.say(f"step {step}: records skipped so far: "
                               + ", ".join(f"{c} {n}" for c, n in totals["skipped"].items() if n))
                window.update(loss=torch.zeros_like(window["loss"]), steps=0, samples=0, tokens=0, padding=0, slots=0,
                              start=time.time())
            report.step(record)
            if args.save_steps and step % args.save_steps == 0 and step < total_steps:
                state = {"step": step, **layout,
                         "totals": {**totals, "wall_time_s": totals["wall_time_s"] + time.time() - began}}
                checkpoint.save(args.output_dir, step, engine, state, args.save_total_limit)
        del batches, loader

    weights = engine.full_state_dict()
    peak = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, dtype=torch.float64)
    if device.type == "cuda":
        peak = torch.tensor(torch.cuda.max_memory_allocated(device) / 2**20, dtype=torch.float64)
    peak = float(_all_reduce(peak.to(device), dist.ReduceOp.MAX if dist.is_initialized() else None))
    summary = {
        "steps": step, "epochs": epochs(step), "samples": totals["samples"],
        "tokens": totals["tokens"], "records_skipped": totals["skipped"], "skipped_examples_rank0": first_bad,
        "final_loss": last_loss, "wall_time_s": round(totals["wall_time_s"] + time.time() - began, 2),
        "peak_memory_mb": round(peak, 1), "peak_memory_kind": "cuda allocated" if device.type == "cuda" else "rss",
        "world_size": world, "engine": type(engine).__name__, "fsdp": args.fsdp_mode, "deepspeed": args.deepspeed,
        "tune_parts": parts, "trainable_parameters": trainable, "frozen_parameters": frozen,
    }
    if rank == 0:
        engine.module.save_pretrained(args.output_dir, state_dict=weights)
        tokenizer.save_pretrained(args.output_dir)
    report.finish(summary)
    report.say(f"saved the model and tokenizer to {args.output_dir}; loss {last_loss:.4f}; summary in "
               f"{os.path.join(args.output_dir, 'train_summary.json')}")
    return summary
