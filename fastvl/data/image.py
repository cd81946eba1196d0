"""Image preprocessing: Qwen2-VL native resolution (packed patches) and SigLIP fixed resolution (+ HD crops).

Both processors take a list of images (PIL images or HWC uint8 numpy arrays), resize with PIL's bicubic filter
on uint8 pixels (as the Hugging Face processors do), rescale by 1/255 and normalise per channel.
"""
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


def smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280):
    """Qwen2-VL's target size: both sides multiples of ``factor``, area within [min_pixels, max_pixels].

    Sides are rounded to the nearest multiple; an area above ``max_pixels`` (below ``min_pixels``) scales both
    sides down (up) by the same ratio, then floors (ceils) them to multiples, so the aspect ratio is kept as
    closely as the grid allows. A side never drops below ``factor``, so a very elongated image may end up a
    little above ``max_pixels``. Aspect ratios above 200 are rejected.
    """
    for name, value in (("height", height), ("width", width), ("factor", factor),
                        ("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio of a {height}x{width} image exceeds {MAX_ASPECT_RATIO}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def to_pil(image, name="images"):
    """An RGB PIL image from a PIL image (any mode; transparency composited onto white, as transformers does;
    16-bit and float images scaled to 8 bits, see ``_to_8bit``) or an HWC uint8 numpy array with 3 channels."""
    if isinstance(image, Image.Image):
        try:
            image.load()
        except OSError as exc:  # a truncated or corrupt file, decoded lazily
            raise ValueError(f"{name}: cannot decode the image ({exc})") from None
        if image.mode in ("I", "F") or image.mode.startswith("I;16"):
            image = _to_8bit(image, name)
        if "A" in image.getbands() or "transparency" in image.info:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"{name}: numpy images must be uint8, got {image.dtype}")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{name}: numpy images must be HWC with 3 channels, got shape {image.shape}")
        return Image.fromarray(image, "RGB")
    raise TypeError(f"{name}: expected a PIL image or a numpy array, got {type(image).__name__}")


def _to_8bit(image, name):
    """An 8-bit 'L' image from a 32/16-bit integer ('I', 'I;16*') or float ('F') one, which converting to RGB
    would clip at 255: integers span the 16-bit range (0..65535, clipped); floats in [0, 1] or [0, 255] keep
    that range, other floats are stretched from their minimum to their maximum."""
    x = np.asarray(image, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: a float image with non-finite pixel values")
    if image.mode != "F":
        x = x / 257.0
    elif x.size and x.min() >= 0 and x.max() <= 1:
        x = x * 255.0
    elif x.size and not (x.min() >= 0 and x.max() <= 255):
        span = x.max() - x.min()
        x = (x - x.min()) * (255.0 / span) if span else np.zeros_like(x)
    return Image.fromarray(np.rint(x).clip(0, 255).astype(np.uint8), "L")


def _image_list(images):
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a list of images, got {type(images).__name__}")
    return [to_pil(im, f"images[{i}]") for i, im in enumerate(images)]


def _channel_stats(value, name):
    """A per-channel (3,) finite float64 array from a float or 3 floats."""
    try:
        stats = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a float or 3 floats, got {value!r}") from None
    stats = np.full(3, float(stats)) if stats.ndim == 0 else stats
    if stats.shape != (3,):
        raise ValueError(f"{name} must be a float or 3 floats, got {value!r}")
    if not np.isfinite(stats).all():
        raise ValueError(f"{name} must be finite, got {value!r}")
    return stats


def _normalize(image, mean, std):
    """uint8 HWC PIL image -> float32 CHW array of (x/255 - mean) / std."""
    x = np.asarray(image, dtype=np.float64) / 255.0
    return ((x - mean) / std).astype(np.float32).transpose(2, 0, 1)


class NativeResolutionProcessor:
    """Qwen2-VL image processing: each image at its own (smart-resized) resolution, cut into patches.

    ``__call__(images)`` returns ``pixel_values`` float32 ``[N, 3 * T * p * p]`` (all images' patches
    concatenated) and ``image_grid_thw`` int64 ``[n_images, 3]`` = (1, H/p, W/p). Rows run over each image in
    merge-window order (windows of m x m patches row-major, the m*m patches of a window consecutive, row-major
    inside it); a row holds channel-major ``(C, T, p, p)`` values, the still image repeated over T frames.

    ``resize_factor`` (default ``patch_size * merge_size``) is the multiple the sides are resized to.
    DeepStack-Efficient gives the LLM one token per (2m x 2m) patches, so it needs ``resize_factor=56`` with
    the usual 14-px patches and merge size 2: the rows are then exactly the ViT input, in window order.
    """

    def __init__(self, patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=56 * 56,
                 max_pixels=28 * 28 * 1280, image_mean=CLIP_MEAN, image_std=CLIP_STD, resize_factor=None):
        resize_factor = patch_size * merge_size if resize_factor is None else resize_factor
        for name, value in (("patch_size", patch_size), ("temporal_patch_size", temporal_patch_size),
                            ("merge_size", merge_size), ("resize_factor", resize_factor)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if resize_factor % (patch_size * merge_size):
            raise ValueError(f"resize_factor ({resize_factor}) must be a multiple of patch_size * merge_size "
                             f"({patch_size * merge_size})")
        smart_resize(resize_factor, resize_factor, resize_factor, min_pixels, max_pixels)  # checks the budget
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self.resize_factor = resize_factor
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.image_mean = _channel_stats(image_mean, "image_mean")
        self.image_std = _channel_stats(image_std, "image_std")
        if (self.image_std <= 0).any():
            raise ValueError(f"image_std must be positive, got {image_std!r}")

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """The processor of a Qwen2-VL / Qwen2.5-VL / SliMM checkpoint directory, from its preprocessor_config.json
        (pixel budget, normalisation, patch and merge sizes; ``overrides`` win). SliMM's DeepStack-Efficient
        checkpoint says ``patch_size`` 28: rows of one 28-px merge window, ``image_grid_thw`` on that grid."""
        file = Path(path) / "preprocessor_config.json"
        try:
            raw = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{file}: cannot read the image processor config ({exc})") from None
        size = raw.get("size") or {}
        fields = dict(
            patch_size=raw.get("patch_size"), temporal_patch_size=raw.get("temporal_patch_size"),
            merge_size=raw.get("merge_size"), min_pixels=raw.get("min_pixels", size.get("shortest_edge")),
            max_pixels=raw.get("max_pixels", size.get("longest_edge")), image_mean=raw.get("image_mean"),
            image_std=raw.get("image_std"),
        )
        return cls(**{k: v for k, v in fields.items() if v is not None} | overrides)

    @property
    def row_size(self):
        return 3 * self.temporal_patch_size * self.patch_size ** 2

    def target_size(self, height, width):
        """(height, width) an image of that size is resized to."""
        return smart_resize(height, width, self.resize_factor, self.min_pixels, self.max_pixels)

    def grid_thw(self, height, width):
        """The ``image_grid_thw`` row of an image of that size, without loading it."""
        h, w = self.target_size(height, width)
        return 1, h // self.patch_size, w // self.patch_size

    def _patches(self, image):
        h, w = self.target_size(image.height, image.width)
        x = _normalize(image.resize((w, h), Image.BICUBIC), self.image_mean, self.image_std)
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = h // p, w // p
        x = x.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # (h/m, w/m, m, m, C, p, p)
        x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (t, p, p))
        return x.reshape(gh * gw, self.row_size), (1, gh, gw)

    def layout(self, sizes):
        """What ``__call__`` returns for images of these (width, height) sizes, without reading them:
        ``pixel_values`` an empty [rows, 0] tensor with the rows the images would give."""
        grid = torch.tensor([self.grid_thw(h, w) for w, h in sizes], dtype=torch.int64).reshape(-1, 3)
        return {"pixel_values": torch.empty(int(grid.prod(1).sum()), 0), "image_grid_thw": grid}

    def __call__(self, images):
        out = [self._patches(im) for im in _image_list(images)]
        pixel_values = np.concatenate([p for p, _ in out]) if out else np.zeros((0, self.row_size), np.float32)
        return {
            "pixel_values": torch.from_numpy(pixel_values),
            "image_grid_thw": torch.tensor([g for _, g in out], dtype=torch.int64).reshape(-1, 3),
        }


class FixedResolutionProcessor:
    """SigLIP-style fixed resolution (FlashSloth).

    ``hd=False``: each image squash-resized to ``size x size`` -> ``pixel_values [n_images, 3, size, size]``.
    ``hd=True``: five crops per image -> ``[5 * n_images, 3, size, size]``: the squash-resized global view, then
    the image padded (centred) to a square with the mean colour, resized to ``2 * size`` and cut into a 2x2 grid
    in the order top-left, top-right, bottom-left, bottom-right. ``crops_per_image`` (1 or 5) is returned too.
    """

    def __init__(self, size=384, mean=0.5, std=0.5, hd=False):
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.size = size
        self.mean = _channel_stats(mean, "mean")
        self.std = _channel_stats(std, "std")
        if (self.std <= 0).any():
            raise ValueError(f"std must be positive, got {std!r}")
        self.hd = bool(hd)
        self.crops_per_image = 5 if self.hd else 1

    def _crops(self, image):
        s = self.size
        crops = [image.resize((s, s), Image.BICUBIC)]
        if self.hd:
            side = max(image.size)
            square = Image.new("RGB", (side, side), tuple(int(c * 255) for c in self.mean))
            square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            square = square.resize((2 * s, 2 * s), Image.BICUBIC)
            crops += [square.crop((x, y, x + s, y + s)) for y in (0, s) for x in (0, s)]
        return [_normalize(c, self.mean, self.std) for c in crops]

    def layout(self, sizes):
        """What ``__call__`` returns for images of these (width, height) sizes, without reading them:
        ``pixel_values`` an empty [crops, 0] tensor with the rows the images would give."""
        return {"pixel_values": torch.empty(len(sizes) * self.crops_per_image, 0),
                "crops_per_image": self.crops_per_image}

    def __call__(self, images):
        crops = [c for im in _image_list(images) for c in self._crops(im)]
        pixel_values = np.stack(crops) if crops else np.zeros((0, 3, self.size, self.size), np.float32)
        return {"pixel_values": torch.from_numpy(pixel_values), "crops_per_image": self.crops_per_image}
