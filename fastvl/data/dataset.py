"""LLaVA-format datasets and the batch collator."""
import json
import os
import reprlib

import torch
from PIL import Image

from .conversation import IGNORE_INDEX, get_template, tokenize_conversation
from .image import to_pil

CAUSES = ("missing_image", "bad_image", "malformed_record", "no_supervised_token", "too_long")


class SampleError(ValueError):
    """A record that cannot become a sample; the message names the file and the record, ``cause`` (one of
    ``CAUSES``) says why. Training skips and counts these; any other exception is a bug or a setting to fix."""

    def __init__(self, message, cause):
        if cause not in CAUSES:
            raise ValueError(f"cause must be one of {CAUSES}, got {cause!r}")
        super().__init__(message)
        self.cause = cause


class MissingImageError(SampleError, FileNotFoundError):
    def __init__(self, message):
        super().__init__(message, "missing_image")


class LlavaDataset(torch.utils.data.Dataset):
    """Samples of a LLaVA JSON (a list of records) or JSONL (one record a line) file.

    A record is ``{"conversations": [...], "image": "rel/path.jpg" | [paths], ...}`` (no ``image``: text only).
    A ``.jsonl`` file is indexed by line offsets and read a record at a time; images are opened on access.
    A sample is ``tokenize_conversation``'s ``input_ids``/``labels`` plus the processor's output for the
    record's images (``pixel_values``, ``image_grid_thw`` or ``crops_per_image``; empty for text-only records).

    ``num_image_tokens``: the visual tokens one image gets in the LLM, an int (FlashSloth: 81, HD: 405) or a
    function of the processor's output returning one count per image, e.g.
    ``lambda out: image_token_counts(out["image_grid_thw"], "patch_merge")``.

    A record that cannot become a sample raises ``SampleError`` naming the file and the record, with its
    ``cause``: ``missing_image`` (also a FileNotFoundError), ``bad_image`` (unreadable, corrupt, or a size the
    processor refuses), ``malformed_record`` (not JSON, not UTF-8, wrong types, a conversation the template
    cannot render), ``no_supervised_token`` (no answer to learn) or ``too_long`` (more than ``max_length``
    tokens; records are never truncated).
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
            with open(json_path, "rb") as f:
                try:
                    self._records = json.load(f)
                except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError on bytes that are not UTF-8
                    raise ValueError(f"json_path: {json_path!r} is not valid JSON in UTF-8 ({e})") from e
            if not isinstance(self._records, list):
                raise ValueError(f"json_path: {json_path!r} must hold a list of records")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length <= 0):
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        # the template's tokens and num_query_tokens are settings: check them here, not as bad records later
        tokenize_conversation([{"from": "human", "value": "?"}, {"from": "gpt", "value": "!"}], tokenizer,
                              self.template, (), num_query_tokens)

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
        """The raw record ``index`` (a dict with a ``conversations`` list); SampleError when it is malformed."""
        if self._records is not None:
            record = self._records[index]
        else:
            with open(self.json_path, "rb") as f:
                f.seek(self._offsets[index])
                line = f.readline()
            try:
                record = json.loads(line)
            except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError on bytes that are not UTF-8
                raise SampleError(f"{self.json_path!r}: record {index} is not valid JSON in UTF-8 ({e})",
                                  "malformed_record") from e
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise SampleError(f"{self.json_path!r}: record {index} has no 'conversations' list", "malformed_record")
        return record

    def _where(self, index, record):
        ident = record.get("id")
        return f"{self.json_path!r}: record {index}" + ("" if ident is None else f" (id {reprlib.repr(ident)})")

    def _image_names(self, record, where):
        names = record.get("image")
        names = [] if names is None else [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise SampleError(f"{where}: 'image' must be a file name or a list of file names, "
                              f"got {reprlib.repr(record.get('image'))}", "malformed_record")
        return names

    def _image_path(self, name, where):
        if self.image_folder is None:
            raise MissingImageError(f"{where}: has images but image_folder is None")
        path = os.path.join(self.image_folder, name)
        if not os.path.isfile(path):
            raise MissingImageError(f"{where}: image {path!r} not found")
        return path

    def _open_image(self, name, where, pixels=True):
        """The image as a PIL RGB image, or with ``pixels=False`` its (width, height) read from its header."""
        path = self._image_path(name, where)
        try:
            with Image.open(path) as image:
                if not pixels:
                    return image.size
                image.load()  # before the file closes
                return to_pil(image)
        except Exception as e:  # a corrupt file can make PIL raise nearly anything (OSError, SyntaxError, ...)
            raise SampleError(f"{where}: image {path!r} cannot be read ({type(e).__name__}: {e})", "bad_image") from e

    def __getitem__(self, index):
        return self._sample(index, pixels=True)

    def layout(self, index):
        """``self[index]`` without the pixels (``pixel_values`` an empty [rows, 0] tensor; the processor's
        ``layout``): its tokens and image rows at the cost of tokenizing, image headers only. Raises the
        SampleError ``self[index]`` raises, except for faults found only by decoding an image."""
        return self._sample(index, pixels=False)

    def _sample(self, index, pixels):
        record = self.record(index)
        where = self._where(index, record)
        names = self._image_names(record, where)
        images = [self._open_image(n, where, pixels) for n in names]
        try:
            processed = self.processor(images) if pixels else self.processor.layout(images)
        except ValueError as e:  # e.g. an aspect ratio the processor refuses
            raise SampleError(f"{where}: an image cannot be processed ({e})", "bad_image") from e
        counts = (list(self.num_image_tokens(processed)) if callable(self.num_image_tokens)
                  else [self.num_image_tokens] * len(names))
        if len(counts) != len(names):
            raise ValueError(f"num_image_tokens gave {len(counts)} counts for the {len(names)} images of {where}")
        try:
            sample = tokenize_conversation(record["conversations"], self.tokenizer, self.template, counts,
                                           self.num_query_tokens)
        except (TypeError, ValueError) as e:
            raise SampleError(f"{where}: {e}", "malformed_record") from e
        length = sample["input_ids"].numel()
        if self.max_length is not None and length > self.max_length:
            raise SampleError(f"{where}: {length} tokens, more than max_length={self.max_length}", "too_long")
        if not (sample["labels"] != IGNORE_INDEX).any():
            raise SampleError(f"{where}: nothing to learn (no answer, so no supervised token)",
                              "no_supervised_token")
        return {**sample, **processed}


class Collator:
    """Batches samples: ``input_ids`` right-padded with the tokenizer's pad id, ``labels`` with IGNORE_INDEX,
    ``attention_mask`` (int64, 1 on real tokens); every other tensor (``pixel_values``, ``image_grid_thw``) is
    concatenated over the batch, so the vision tower runs once over all images, in sample order; other values
    (``crops_per_image``) must agree across the batch and are passed on.

    ``packed=True``: no padding: the samples in one row as ``transformers.DataCollatorWithFlattening`` lays them
    out (``input_ids``/``labels`` [1, ΣL], ``labels`` IGNORE_INDEX on each sample's first token, ``position_ids``
    restarting at 0, ``cu_seq_lens_q``/``cu_seq_lens_k`` and ``max_length_q``/``max_length_k``), no attention mask.
    """

    def __init__(self, tokenizer, packed=False):
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token (set tokenizer.pad_token)")
        self.pad_token_id = tokenizer.pad_token_id
        self.flatten = None
        if packed:
            from transformers import DataCollatorWithFlattening

            self.flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=True, separator_id=IGNORE_INDEX)

    def __call__(self, samples):
        if not samples:
            raise ValueError("samples: empty batch")
        text = self._pack(samples) if self.flatten is not None else self._pad(samples)
        batch = dict(text)
        for key in sorted(set().union(*samples) - {"input_ids", "labels"}):
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

    def _pad(self, samples):
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
        return batch

    def _pack(self, samples):
        if any(s["input_ids"].numel() == 0 for s in samples):
            raise ValueError("samples: a packed batch takes no empty sample")
        return self.flatten([{"input_ids": s["input_ids"], "labels": s["labels"]} for s in samples])
