"""LLaVA-format datasets and the batch collator."""
import json
import os

import torch
from PIL import Image

from .conversation import IGNORE_INDEX, get_template, tokenize_conversation
from .image import to_pil


class LlavaDataset(torch.utils.data.Dataset):
    """Samples of a LLaVA JSON (a list of records) or JSONL (one record a line) file.

    A record is ``{"conversations": [...], "image": "rel/path.jpg" | [paths], ...}`` (no ``image``: text only).
    A ``.jsonl`` file is indexed by line offsets and read a record at a time; images are opened on access.
    A sample is ``tokenize_conversation``'s ``input_ids``/``labels`` plus the processor's output for the
    record's images (``pixel_values``, ``image_grid_thw`` or ``crops_per_image``; empty for text-only records).

    ``num_image_tokens``: the visual tokens one image gets in the LLM, an int (FlashSloth: 81, HD: 405) or a
    function of the processor's output returning one count per image, e.g.
    ``lambda out: image_token_counts(out["image_grid_thw"], "patch_merge")``.
    """

    def __init__(self, json_path, image_folder, tokenizer, processor, template, num_image_tokens,
                 num_query_tokens=0, max_length=None):
        json_path = os.fspath(json_path)
        if not os.path.isfile(json_path):
            raise FileNotFoundError(f"json_path: no such file {json_path!r}")
        if image_folder is not None and not os.path.isdir(image_folder):
            raise FileNotFoundError(f"image_folder: no such directory {image_folder!r}")
        if not callable(num_image_tokens) and (isinstance(num_image_tokens, bool)
                                               or not isinstance(num_image_tokens, int) or num_image_tokens < 0):
            raise ValueError(f"num_image_tokens must be a non-negative int or a function, got {num_image_tokens!r}")
        self.json_path = json_path
        self.image_folder = image_folder
        self.tokenizer = tokenizer
        self.processor = processor
        self.template = get_template(template)
        self.num_image_tokens = num_image_tokens
        self.num_query_tokens = num_query_tokens
        self.max_length = max_length
        self._records = self._offsets = None
        if json_path.endswith(".jsonl"):
            self._offsets = self._line_offsets(json_path)
        else:
            with open(json_path, encoding="utf-8") as f:
                try:
                    self._records = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"json_path: {json_path!r} is not valid JSON ({e})") from e
            if not isinstance(self._records, list):
                raise ValueError(f"json_path: {json_path!r} must hold a list of records")

    @staticmethod
    def _line_offsets(path):
        offsets, pos = [], 0
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        return offsets

    def __len__(self):
        return len(self._records) if self._records is not None else len(self._offsets)

    def record(self, index):
        """The raw record ``index`` (a dict with ``conversations``)."""
        if self._records is not None:
            record = self._records[index]
        else:
            with open(self.json_path, "rb") as f:
                f.seek(self._offsets[index])
                line = f.readline()
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.json_path!r}: record {index} is not valid JSON ({e})") from e
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise ValueError(f"{self.json_path!r}: record {index} has no 'conversations' list")
        return record

    def _open_image(self, name, index, record):
        if self.image_folder is None:
            raise ValueError(f"record {index} has images but image_folder is None")
        path = os.path.join(self.image_folder, name)
        where = f"image {path!r} of record {index}" + (f" (id {record['id']!r})" if "id" in record else "")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where} not found")
        try:
            with Image.open(path) as image:
                image.load()  # before the file closes
                return to_pil(image)
        except OSError as e:
            raise ValueError(f"{where} cannot be read ({e})") from e

    def __getitem__(self, index):
        record = self.record(index)
        names = record.get("image") or []
        names = [names] if isinstance(names, str) else names
        processed = self.processor([self._open_image(n, index, record) for n in names])
        counts = (list(self.num_image_tokens(processed)) if callable(self.num_image_tokens)
                  else [self.num_image_tokens] * len(names))
        if len(counts) != len(names):
            raise ValueError(f"num_image_tokens gave {len(counts)} counts for the {len(names)} images "
                             f"of record {index}")
        sample = tokenize_conversation(record["conversations"], self.tokenizer, self.template, counts,
                                       self.num_query_tokens, self.max_length)
        return {**sample, **processed}


class Collator:
    """Batches samples: ``input_ids`` right-padded with the tokenizer's pad id, ``labels`` with IGNORE_INDEX,
    ``attention_mask`` (int64, 1 on real tokens); every other tensor (``pixel_values``, ``image_grid_thw``) is
    concatenated over the batch, so the vision tower runs once over all images, in sample order; other values
    (``crops_per_image``) must agree across the batch and are passed on."""

    def __init__(self, tokenizer):
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token (set tokenizer.pad_token)")
        self.pad_token_id = tokenizer.pad_token_id

    def __call__(self, samples):
        if not samples:
            raise ValueError("samples: empty batch")
        lengths = [s["input_ids"].numel() for s in samples]
        batch = {
            "input_ids": torch.full((len(samples), max(lengths)), self.pad_token_id, dtype=torch.int64),
            "labels": torch.full((len(samples), max(lengths)), IGNORE_INDEX, dtype=torch.int64),
            "attention_mask": torch.zeros(len(samples), max(lengths), dtype=torch.int64),
        }
        for row, (sample, n) in enumerate(zip(samples, lengths)):
            batch["input_ids"][row, :n] = sample["input_ids"]
            batch["labels"][row, :n] = sample["labels"]
            batch["attention_mask"][row, :n] = 1
        for key in sorted(set().union(*samples) - batch.keys()):
            if any(key not in s for s in samples):
                raise ValueError(f"samples: {key!r} is missing from some samples")
            values = [s[key] for s in samples]
            if isinstance(values[0], torch.Tensor):
                batch[key] = torch.cat(values)
            elif any(v != values[0] for v in values):
                raise ValueError(f"samples: {key!r} differs across the batch ({values})")
            else:
                batch[key] = values[0]
        return batch
