"""Training data: datasets from a LLaVA file or a YAML list, bad records turned into counted skips, the
batch collator, and a sampler that resumes mid-epoch."""
import math
import os
import random

import torch
from PIL import Image

from ..data import IGNORE_INDEX, Collator, LlavaDataset, SampleError

SAMPLING = ("all", "first", "end", "random")


def _sample(n, strategy, seed, where):
    """Record indices a SliMM/LLaVA-NeXT ``sampling_strategy`` keeps of ``n``: ``all``, ``first:N``, ``end:N``,
    ``random:N``, N a count or a percentage (``first:10%``)."""
    kind, _, amount = str(strategy).partition(":")
    if kind not in SAMPLING or (kind == "all") != (amount == ""):
        raise ValueError(f"{where}: sampling_strategy must be all, first:N, end:N or random:N "
                         f"(N a count or P%), got {strategy!r}")
    if kind == "all":
        return list(range(n))
    try:
        count = math.ceil(float(amount[:-1]) * n / 100) if amount.endswith("%") else int(amount)
    except ValueError:
        count = -1
    if count < 0:
        raise ValueError(f"{where}: sampling_strategy {strategy!r}: N must be a count or a percentage")
    count = min(count, n)
    if kind == "first":
        return list(range(count))
    if kind == "end":
        return list(range(n - count, n))
    return sorted(random.Random(seed).sample(range(n), count))


def build_dataset(data_path, image_folder, seed, **dataset_kwargs):
    """A LlavaDataset, or for a ``.yaml`` the concatenation of its ``datasets`` list: entries with ``json_path``,
    optional ``sampling_strategy`` and ``image_folder`` (default: ``image_folder``), as SliMM / LLaVA-NeXT."""
    if not data_path.endswith((".yaml", ".yml")):
        return LlavaDataset(data_path, image_folder, **dataset_kwargs)
    import yaml

    with open(data_path) as f:
        spec = yaml.safe_load(f)
    entries = spec.get("datasets") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"data_path: {data_path!r} must hold a non-empty 'datasets' list")
    parts = []
    for i, entry in enumerate(entries):
        where = f"data_path: {data_path!r} datasets[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("json_path"), str):
            raise ValueError(f"{where} needs a json_path")
        json_path = os.path.join(os.path.dirname(data_path), entry["json_path"])
        data = LlavaDataset(json_path, entry.get("image_folder", image_folder), **dataset_kwargs)
        keep = _sample(len(data), entry.get("sampling_strategy", "all"), seed + i, where)
        parts.append(torch.utils.data.Subset(data, keep))
    return torch.utils.data.ConcatDataset(parts)


class SkippingDataset(torch.utils.data.Dataset):
    """``dataset[i]``, or ``{"skipped": cause, "error": message}`` when the record raises SampleError."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except SampleError as e:
            return {"skipped": e.cause, "error": str(e)}


def filler_sample(processor, num_image_tokens, image_token_id, pad_token_id, query_token_id=None, num_queries=0):
    """One smallest black image, its image tokens, a text token and the EmbQ queries, no label: a row that makes
    every vision-side module run and adds nothing to the loss (its gradients are exactly zero)."""
    processed = processor([Image.new("RGB", (1, 1))])
    counts = (num_image_tokens(processed) if callable(num_image_tokens) else [num_image_tokens])
    ids = [image_token_id] * sum(counts) + [pad_token_id] + [query_token_id] * num_queries
    return {"input_ids": torch.tensor(ids), "labels": torch.full((len(ids),), IGNORE_INDEX), **processed}


class TrainCollator:
    """Batches for training: skipped records are dropped (and reported in ``batch["skipped"]``: (cause, message)
    pairs); a batch without images gets ``filler`` as an extra row, so every rank runs the vision tower and the
    compressor at every step (ZeRO-3 and FSDP gather their weights collectively; DDP expects every gradient).
    ``num_samples``/``num_tokens`` count the real samples and their tokens; ``num_items`` the supervised tokens
    (label positions the causal-LM loss uses: the loss is normalised by their sum over the global batch)."""

    def __init__(self, tokenizer, filler):
        self.collate = Collator(tokenizer)
        self.filler = filler

    def __call__(self, items):
        samples = [s for s in items if "skipped" not in s]
        skipped = [(s["skipped"], s["error"]) for s in items if "skipped" in s]
        tokens = sum(s["input_ids"].numel() for s in samples)
        rows = samples if any(s["pixel_values"].shape[0] for s in samples) else samples + [self.filler]
        batch = self.collate(rows)
        batch.update(num_samples=len(samples), num_tokens=tokens, skipped=skipped,
                     num_items=int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))
        return batch


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (seeded shuffle per epoch, equal shares per rank) that can start an epoch at ``start``
    indices into this rank's share: a resumed run sees exactly the samples the interrupted one had left."""

    def __init__(self, dataset, num_replicas, rank, seed):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_epoch(self, epoch, start=0):
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self):
        return self.num_samples - self.start
