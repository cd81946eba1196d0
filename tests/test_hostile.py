"""Hostile inputs outside the ops: image files and modes, processor scalars, token counts, the command line.

Each kind of input is tested as a class (every high-bit-depth mode, every non-finite value, every degenerate
size), not one instance. The ops' own classes are in test_validation.py.
"""
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastvl.cli import main as cli
from fastvl.data import FixedResolutionProcessor, NativeResolutionProcessor, image_token_counts
from fastvl.data.image import to_pil

NON_FINITE = [math.nan, math.inf, -math.inf]


def gradient(mode, low, high, shape=(32, 64)):
    """A horizontal ramp from low to high in ``mode`` (I;16 through a PNG round trip, as files open)."""
    ramp = np.broadcast_to(np.linspace(low, high, shape[1]), shape)
    if mode == "F":
        return Image.fromarray(ramp.astype(np.float32), "F")
    if mode == "I":
        return Image.fromarray(ramp.astype(np.int32), "I")
    dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2"}[mode]
    image = Image.frombytes(mode, shape[::-1], np.ascontiguousarray(ramp.astype(dtype)).tobytes())
    if mode != "I;16":
        return image
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize("mode, low, high", [
    ("I;16", 0, 65535), ("I;16L", 0, 65535), ("I;16B", 0, 65535), ("I", 0, 65535),
    ("F", 0.0, 1.0), ("F", 0.0, 255.0), ("F", -3.0, 4000.0),
])
def test_high_bit_depth_images_keep_their_range(mode, low, high):
    """A full-range ramp becomes a full 8-bit ramp: no saturation, monotonic, both ends reached."""
    rgb = np.asarray(to_pil(gradient(mode, low, high)))
    assert rgb.shape == (32, 64, 3)
    row = rgb[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and (np.diff(row) >= 0).all()
    assert abs(rgb.mean() - 127.5) < 3, "the ramp's mean must stay mid-grey"


@pytest.mark.parametrize("value", NON_FINITE)
def test_float_image_with_non_finite_pixels(value):
    x = np.zeros((8, 8), np.float32)
    x[3, 4] = value
    with pytest.raises(ValueError, match=r"^images\[0\]: .*non-finite"):
        NativeResolutionProcessor()([Image.fromarray(x, "F")])


@pytest.mark.parametrize("processor", [NativeResolutionProcessor, FixedResolutionProcessor])
def test_truncated_image_file(processor):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buffer, "PNG")
    image = Image.open(io.BytesIO(buffer.getvalue()[:60]))
    with pytest.raises(ValueError, match=r"^images\[0\]: cannot decode"):
        processor()([image])


@pytest.mark.parametrize("processor, names", [
    (NativeResolutionProcessor, ("image_mean", "image_std")), (FixedResolutionProcessor, ("mean", "std")),
])
@pytest.mark.parametrize("value", NON_FINITE + [[0.5, math.nan, 0.5], [math.inf] * 3])
def test_processor_statistics_must_be_finite(processor, names, value):
    for name in names:
        with pytest.raises(ValueError, match=f"^{name} must be finite"):
            processor(**{name: value})
    with pytest.raises(TypeError, match=f"^{names[1]} "):
        processor(**{names[1]: "wide"})


@pytest.mark.parametrize("grid, kwargs, error, match", [
    ([[1, 4, 4]], dict(compressor="sap", window=0), ValueError, "^window "),
    ([[1, 4, 4]], dict(compressor="sap", window=-3), ValueError, "^window "),
    ([[1, 4, 4]], dict(compressor="sap", window=True), ValueError, "^window "),
    ([[1, 4, 4]], dict(compressor="patch_merge", merge_size=0), ValueError, "^merge_size "),
    ([[1, 4, 4]], dict(compressor="deepstack_efficient", merge_size=2.0), ValueError, "^merge_size "),
    ([[1, 2.5, 4]], dict(compressor="none"), TypeError, "^image_grid_thw .*integers"),
    (torch.tensor([[1.0, 4.0, 4.0]]), dict(compressor="patch_merge"), TypeError, "^image_grid_thw .*integers"),
    ([[True, True, True]], dict(compressor="none"), TypeError, "^image_grid_thw .*integers"),
])
def test_image_token_counts_degenerate_arguments(grid, kwargs, error, match):
    with pytest.raises(error, match=match):
        image_token_counts(grid, **kwargs)


# ---- the command line: status 2 and the offending argument or path, never a traceback

def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["--help"])
    assert exit_.value.code == 0 and "``" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("fastvl ")


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", ""])
def test_generate_max_new_tokens_must_be_positive(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["generate", "--model", str(tmp_path), "--image", "x.png", "--prompt", "p", "--max-new-tokens", value])
    assert exit_.value.code == 2 and "--max-new-tokens" in capsys.readouterr().err


def test_generate_unreadable_images(tmp_path, capsys, monkeypatch):
    """Undecodable and truncated files, and a decompression bomb, exit 2 naming the path before any model loads."""
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 2x-over-the-limit image is refused as a bomb
    files = {"bomb.png": Image.new("RGB", (100, 100)), "truncated.png": Image.new("RGB", (64, 64), (9, 9, 9))}
    for name, image in files.items():
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        data = buffer.getvalue()
        (tmp_path / name).write_bytes(data[: len(data) // 2] if name.startswith("truncated") else data)
    (tmp_path / "text.png").write_text("not an image")
    for name in ("bomb.png", "truncated.png", "text.png"):
        path = tmp_path / name
        assert cli(["generate", "--model", str(tmp_path), "--image", str(path), "--prompt", "p"]) == 2
        assert str(path) in capsys.readouterr().err


@pytest.mark.parametrize("size", [(10000, 10), (10, 10000)])
def test_generate_elongated_image(size, tmp_path, capsys, monkeypatch):
    """An aspect ratio the model's processor refuses exits 2 naming the image (the loaders are stubbed)."""
    import fastvl.models
    from fastvl.models import FastVLConfig, FastVLForConditionalGeneration

    config = FastVLConfig(
        vision_config=dict(depth=1, embed_dim=64, num_heads=1, intermediate_size=64), image_token_id=3,
        text_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1,
                         num_key_value_heads=1, vocab_size=16),
    )
    model = FastVLForConditionalGeneration(config)
    monkeypatch.setattr(FastVLForConditionalGeneration, "from_pretrained", lambda *args, **kwargs: model)
    monkeypatch.setattr(fastvl.models, "load_tokenizer", lambda *args, **kwargs: None)
    (tmp_path / "config.json").write_text("{}")
    path = tmp_path / "long.png"
    Image.new("RGB", size).save(path)
    assert cli(["generate", "--model", str(tmp_path), "--image", str(path), "--prompt", "p"]) == 2
    assert str(path) in capsys.readouterr().err
