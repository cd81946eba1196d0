"""Training data: datasets from a LLaVA file or a YAML list, bad records turned into counted skips, the
batch collator, a sampler that resumes mid-epoch, and token-budget packing."""
import bisect
import math
import os
import random

import torch
import torch.distributed as dist
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
    pairs); a batch without images gets ``filler`` as an extra sample, so every rank runs the vision tower and the
    compressor at every step (ZeRO-3 and FSDP gather their weights collectively; DDP expects every gradient).
    ``packed``: the samples in one row without padding (``Collator(packed=True)``).
    ``num_samples``/``num_tokens`` count the real samples and their tokens; ``num_items`` the supervised tokens
    (label positions the causal-LM loss uses: the loss is normalised by their sum over the global batch);
    ``num_slots`` the positions of ``input_ids``, ``num_padding`` how many of them are padding (0 when packed)."""

    def __init__(self, tokenizer, filler, packed=False):
        self.collate = Collator(tokenizer, packed=packed)
        self.filler = filler

    def __call__(self, items):
        samples = [s for s in items if "skipped" not in s]
        skipped = [(s["skipped"], s["error"]) for s in items if "skipped" in s]
        tokens = sum(s["input_ids"].numel() for s in samples)
        rows = samples if any(s["pixel_values"].shape[0] for s in samples) else samples + [self.filler]
        batch = self.collate(rows)
        padding = int((batch["attention_mask"] == 0).sum()) if "attention_mask" in batch else 0
        batch.update(num_samples=len(samples), num_tokens=tokens, skipped=skipped, num_padding=padding,
                     num_slots=batch["input_ids"].numel(),
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


# ------------------------------------------------------------------------------------------------- packing

def _leaf(dataset, index):
    """The dataset (not a Subset or ConcatDataset) and index that ``dataset[index]`` reads."""
    while True:
        if isinstance(dataset, torch.utils.data.Subset):
            dataset, index = dataset.dataset, dataset.indices[index]
        elif isinstance(dataset, torch.utils.data.ConcatDataset):
            part = bisect.bisect_right(dataset.cumulative_sizes, index)
            index -= dataset.cumulative_sizes[part - 1] if part else 0
            dataset = dataset.datasets[part]
        else:
            return dataset, index


class _Sizes(torch.utils.data.Dataset):
    """(LLM tokens, ViT patches) of record ``i``, None when it raises SampleError (LlavaDataset.layout)."""

    def __init__(self, dataset, vit_patches):
        self.dataset, self.vit_patches = dataset, vit_patches

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        leaf, index = _leaf(self.dataset, index)
        try:
            sample = leaf.layout(index)
        except SampleError:
            return None
        return sample["input_ids"].numel(), self.vit_patches(sample)


def _items(batch):
    return batch


def sample_sizes(dataset, vit_patches, rank=0, world=1, workers=0):
    """(LLM tokens, ViT patches) of every record of ``dataset`` (None for a record that cannot become a sample), from
    its text and image headers: each rank measures a strided share in ``workers`` DataLoader workers, then the
    ranks gather every share."""
    loader = torch.utils.data.DataLoader(_Sizes(dataset, vit_patches), sampler=range(rank, len(dataset), world),
                                         batch_size=None, collate_fn=_items, num_workers=workers)
    shares = [list(loader)]
    if dist.is_initialized():
        mine, shares = shares[0], [None] * world
        dist.all_gather_object(shares, mine)
    sizes = [None] * len(dataset)
    for r, part in enumerate(shares):
        sizes[r::world] = part
    return sizes


def best_fit_decreasing(items, max_tokens, max_patches=None):
    """Bins (lists of item ids, in ``items`` order) of ``items`` (id, tokens, patches): longest first, each into the
    open bin with the least room left that takes its tokens and patches, else a new bin. An item alone above a
    limit gets a bin of its own."""
    room, bins, patch_room = [], [], []  # room: sorted (tokens left, bin); bins: positions in items
    position = {ident: i for i, (ident, _, _) in enumerate(items)}
    for ident, tokens, patches in sorted(items, key=lambda item: (-item[1], -item[2])):  # stable: ties keep order
        at = bisect.bisect_left(room, (tokens, -1))
        while at < len(room) and patch_room[room[at][1]] < patches:
            at += 1
        if at < len(room):
            left, b = room.pop(at)
        else:
            b, left = len(bins), max_tokens
            bins.append([])
            patch_room.append(math.inf if max_patches is None else max_patches)
        bins[b].append(position[ident])
        patch_room[b] -= patches
        bisect.insort(room, (left - tokens, b))
    return [[items[i][0] for i in sorted(found)] for found in bins]


class PackedBatches(torch.utils.data.Sampler):
    """Micro-batches of record indices filled up to ``max_tokens`` LLM tokens and at most ``max_patches`` ViT
    patches (a batch sampler). Each epoch: a seeded shuffle of every record (the same on every rank), cut into
    windows of ``window`` records; each window packed by ``best_fit_decreasing``, its micro-batches in a seeded
    random order; micro-batch i goes to rank i % world, every rank the same number (the rest dropped, as
    drop_last). ``sizes``: ``sample_sizes``; a record that cannot become a sample (None) costs nothing and rides
    along, to be counted as skipped when loaded. ``set_epoch(epoch, start)`` skips this rank's first ``start``
    micro-batches (resume)."""

    def __init__(self, sizes, num_replicas, rank, seed, max_tokens, max_patches=None, window=2048):
        self.sizes = [(0, 0) if s is None else s for s in sizes]
        self.world, self.rank, self.seed = num_replicas, rank, seed
        self.max_tokens, self.max_patches, self.window = max_tokens, max_patches, window
        self.epoch = self.start = 0
        self._plan = (None, None)
        self._counts = {}

    def plan(self, epoch):
        """Every micro-batch of ``epoch`` (all ranks), in order."""
        if self._plan[0] != epoch:
            order = torch.randperm(len(self.sizes), generator=torch.Generator().manual_seed(self.seed + epoch))
            order, rng, batches = order.tolist(), random.Random(self.seed + epoch), []
            for lo in range(0, len(order), self.window):
                items = [(i, *self.sizes[i]) for i in order[lo:lo + self.window]]
                packed = best_fit_decreasing(items, self.max_tokens, self.max_patches)
                rng.shuffle(packed)
                batches += packed
            self._plan = (epoch, batches)
            self._counts[epoch] = len(batches) // self.world
        return self._plan[1]

    def num_batches(self, epoch):
        """Micro-batches per rank in ``epoch``."""
        if epoch not in self._counts:
            self.plan(epoch)
        return self._counts[epoch]

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __iter__(self):
        mine = self.plan(self.epoch)[self.rank::self.world][:self.num_batches(self.epoch)]
        return iter(mine[self.start:])

    def __len__(self):
        return self.num_batches(self.epoch) - self.start
