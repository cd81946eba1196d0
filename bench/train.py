"""A training step of a whole VLM on a LLaVA-like mix of samples: fastvl with packing against padded batches.

The model is Qwen2-VL's architecture at Qwen2-VL-2B-ViT / Qwen2-0.5B-LLM size on a GPU (a 32-block 1280-wide native
tower, its 2x2 merger, a 24-layer 896-wide Qwen2 LLM with M-RoPE; random weights from configs); on a CPU every width
and depth is scaled down and so are the images and texts (``scaled`` in the case name). One step is forward +
backward into every weight over the same S samples (drawn by ``llava_like``, random token ids, the answer
supervised, loss normalised by the step's supervised tokens) in micro-batches:

- ``hf-<attention>``: transformers' ``Qwen2VLForConditionalGeneration`` as Hugging Face training runs it: micro-batches
  of B samples right-padded with an attention mask, logits everywhere, its best attention (flash_attention_2 when
  installed on a GPU, else sdpa);
- ``fastvl-padded``: ``FastVLForConditionalGeneration`` on the same padded micro-batches, as ``fastvl train`` feeds it
  without ``--packing`` (fastvl ops on the vision side, sdpa in the LLM, logits on supervised positions only);
- ``fastvl-packed``: the same model and samples packed into micro-batches of at most N LLM tokens (N = B x the mean
  sample length; ``PackedBatches``' best-fit decreasing), the ``"fastvl"`` attention, as ``fastvl train --packing``.

Columns: LLM tokens (real, not padding), samples and images per second of the step, ``peak_mb`` the GPU memory the
step allocates above the weights (gradients included), ``padding_pct`` the share of LLM token positions that are
padding, ``mfu`` the useful FLOPs (counted by ``flops.py`` on the packed step: no padding) per second over the
measured dense-matmul peak of the same dtype, and throughput and memory ratios against the transformers row.
A second case packs a 20000-sample LLaVA-like mix at several budgets without running a model: ``unfilled_pct`` is
the share of the micro-batches' token budget left empty (the padding a fixed N-token buffer would hold), beside the
padding of B=8 padded batches of the same samples.
"""
import math
import random
import re
import sys

import torch

import fastvl

from . import common, flops
from .common import Registry, is_cuda
from .model import SIZES, _qwen2, _qwen_vit
from .vit_train import hf_attention

SUITE = "train"
TITLE = "VLM training step on a LLaVA-like mix: fastvl packed vs padded batches as transformers runs them"
COLUMNS = (("case", "case"), ("impl", "impl"), ("samples", "samples"), ("micro_batches", "micro-batches"),
           ("tokens", "LLM tokens"), ("padding_pct", "padding %"), ("unfilled_pct", "unfilled %"),
           ("step_ms", "step (min-max)"), ("tokens_s", "tokens/s"), ("samples_s", "samples/s"),
           ("images_s", "images/s"), ("peak_mb", "peak MiB"), ("mfu", "MFU"), ("vs", "vs"), ("speedup", "speedup"),
           ("mem_ratio", "mem ratio"))
TARGET_SPEEDUP, TARGET_MEMORY, TARGET_PADDING_PCT = 1.5, 0.8, 2.0
MROPE = [8, 12, 12]  # head_dim 64 at every scale: 32 rotary frequencies
BATCH = 8  # samples per padded micro-batch (B)


# ------------------------------------------------------------------ the data
def llava_like(n, seed, max_pixels=28 * 28 * 1280, text_scale=1.0, max_tokens=2048):
    """``n`` samples (text tokens, image patch grid (h, w) or None) of a LLaVA-1.5-like mix under Qwen2-VL's image
    processor (``max_pixels``): 8% text-only conversations (log-normal, median 400 tokens), the others one image
    of 0.7-1.3x a COCO/VG/TextVQA-like size (640x480, 500x375, 800x600, 1024x768, 336x448, 1280x960) and a
    conversation of median 120 tokens; ``text_scale`` shortens the texts; samples over ``max_tokens`` LLM tokens
    (``llm_tokens``) are dropped."""
    from fastvl.data import NativeResolutionProcessor

    processor = NativeResolutionProcessor(max_pixels=max_pixels)
    rng = random.Random(seed)
    sizes = [(640, 480), (500, 375), (800, 600), (1024, 768), (336, 448), (1280, 960)]
    weights = [0.45, 0.2, 0.1, 0.1, 0.1, 0.05]
    out = []
    while len(out) < n:
        if rng.random() < 0.08:
            sample = (max(8, int(text_scale * min(rng.lognormvariate(math.log(400), 0.8), 4096))), None)
        else:
            (w, h), = rng.choices(sizes, weights)
            scale = rng.uniform(0.7, 1.3)
            _, gh, gw = processor.grid_thw(int(h * scale), int(w * scale))
            sample = (max(8, int(text_scale * min(rng.lognormvariate(math.log(120), 0.9), 1500))) + 20, (gh, gw))
        if llm_tokens(sample) <= max_tokens:
            out.append(sample)
    return out


def llm_tokens(sample):
    """LLM tokens of a ``llava_like`` sample: its text, and an image's 2x2-merged patches between its vision start
    and end tokens."""
    text, grid = sample
    return text + (0 if grid is None else grid[0] * grid[1] // 4 + 2)


def padded_fraction(lengths, batch):
    """Share of the token positions of micro-batches of ``batch`` consecutive samples, right-padded, that is
    padding."""
    slots = sum(len(lengths[i:i + batch]) * max(lengths[i:i + batch]) for i in range(0, len(lengths), batch))
    return 1 - sum(lengths) / slots


def pack(lengths, max_tokens, window=2048):
    """Micro-batches (lists of sample indices) of at most ``max_tokens``, as ``fastvl train --packing`` packs them."""
    from fastvl.train.data import PackedBatches

    return PackedBatches([(n, 0) for n in lengths], 1, 0, 0, max_tokens, window=window).plan(0)


def fill_rows(quick, common_row):
    """The padding case: no model, the packing of a LLaVA-like mix at several budgets."""
    n = 2000 if quick else 20000
    lengths = [llm_tokens(s) for s in llava_like(n, seed=1)]
    case = f"packing: LLaVA-like mix, {n} samples (mean {sum(lengths) / n:.0f}, max {max(lengths)} LLM tokens)"
    base = {**common_row, "case": case, "samples": n, "tokens": sum(lengths)}
    rows = [{**base, "impl": f"padded B={BATCH}", "micro_batches": math.ceil(n / BATCH),
             "padding_pct": 100 * padded_fraction(lengths, BATCH)}]
    for budget in (4096, 8192, 16384):
        batches = pack(lengths, budget)
        rows.append({**base, "impl": f"packed N={budget}", "micro_batches": len(batches), "padding_pct": 0.0,
                     "unfilled_pct": 100 * (1 - sum(lengths) / (len(batches) * budget))})
    return rows


# ------------------------------------------------------------------ models and batches
def configs(sz, vocab):
    """(FastVLConfig, Qwen2VLConfig) of the same architecture; the top vocabulary ids are the special tokens."""
    from transformers import Qwen2VLConfig

    from fastvl.models import FastVLConfig

    vision, text = _qwen_vit(sz), _qwen2(sz)
    text.tie_word_embeddings = True
    ids = dict(image_token_id=vocab - 1, video_token_id=vocab - 2, vision_start_token_id=vocab - 3,
               vision_end_token_id=vocab - 4)
    ours = FastVLConfig(vision_config=vision, text_config=text, compressor="patch_merge", mrope_section=MROPE,
                        image_token_id=ids["image_token_id"])
    hf_text = {**text.to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": MROPE}}
    hf = Qwen2VLConfig(text_config=hf_text, vision_config=dict(
        depth=vision.depth, embed_dim=vision.embed_dim, num_heads=vision.num_heads, hidden_size=text.hidden_size,
        mlp_ratio=vision.intermediate_size // vision.embed_dim), **ids)
    return ours, hf


def make_samples(draws, vocab, row_size, gen):
    """Token ids and pixel rows of ``llava_like`` draws: prompt text, the image between its vision start/end tokens,
    the rest of the prompt, then the answer (60% of the text, supervised)."""
    samples = []
    for text, grid in draws:
        answer = max(1, int(0.6 * text))
        words = torch.randint(8, vocab - 16, (text,), generator=gen).tolist()
        image = [] if grid is None else [vocab - 3] + [vocab - 1] * (grid[0] * grid[1] // 4) + [vocab - 4]
        prompt = words[:2] + image + words[2:text - answer]
        ids = torch.tensor(prompt + words[text - answer:])
        patches = 0 if grid is None else grid[0] * grid[1]
        samples.append({"input_ids": ids, "labels": torch.cat([torch.full((len(prompt),), -100), ids[len(prompt):]]),
                        "pixel_values": torch.randn(patches, row_size, generator=gen),
                        "image_grid_thw": torch.tensor([[1, *grid]] if grid else [], dtype=torch.int64).reshape(-1, 3)})
    return samples


class _Pad:
    pad_token_id = 0


def micro_batches(samples, packed_to=None):
    """Padded micro-batches of BATCH samples, or packed ones of at most ``packed_to`` tokens, as fastvl train
    collates them."""
    from fastvl.data import Collator

    if packed_to is None:
        return [Collator(_Pad)(samples[i:i + BATCH]) for i in range(0, len(samples), BATCH)]
    lengths = [s["input_ids"].numel() for s in samples]
    return [Collator(_Pad, packed=True)([samples[i] for i in group]) for group in pack(lengths, packed_to)]


def padding(batches):
    """Share of the batches' token positions that is padding."""
    pads = sum(int((b["attention_mask"] == 0).sum()) for b in batches if "attention_mask" in b)
    return pads / sum(b["input_ids"].numel() for b in batches)


def inputs_of(name, batches, image_token_id, device, dtype):
    """The model inputs of each micro-batch for row ``name`` on ``device``: transformers' (with its
    mm_token_type_ids; no pixel inputs for a micro-batch without images), or fastvl train's."""
    from fastvl.train.engine import model_inputs

    out = []
    for b in batches:
        if name.startswith("hf"):
            inputs = {k: b[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == image_token_id).int()
            if b["pixel_values"].shape[0]:
                inputs.update(pixel_values=b["pixel_values"].to(device, dtype), image_grid_thw=b["image_grid_thw"].to(device))
        else:
            inputs = model_inputs(b, device)
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        out.append(inputs)
    return out


def build(name, ours_config, hf_config, device, dtype):
    """The model of row ``name`` in training mode."""
    with torch.device(device):
        if name.startswith("hf"):
            from transformers import Qwen2VLForConditionalGeneration

            return Qwen2VLForConditionalGeneration._from_config(hf_config, attn_implementation=hf_attention(device),
                                                                dtype=dtype).train()
        from fastvl.models import FastVLForConditionalGeneration

        model = FastVLForConditionalGeneration._from_config(ours_config, dtype=dtype).train()
    if name == "fastvl-packed":
        from fastvl.integrations import register_attention

        register_attention()
        model.set_attn_implementation({"text_config": "fastvl"})
    return model


def step_fn(model, inputs, items, backend):
    """Zeroes the gradients, then forward + backward over every micro-batch's inputs on the fastvl ``backend``."""
    def step():
        for p in model.parameters():
            p.grad = None
        with fastvl.use_backend(backend):
            for batch in inputs:
                model(**batch, num_items_in_batch=items).loss.backward()
    return step


IMPLS = Registry()  # rows of the step case; ``fn``: the micro-batches each runs
IMPLS.register("hf", "padded")
IMPLS.register("fastvl-padded", "padded")
IMPLS.register("fastvl-packed", "packed")
SCALES = {"real": (32, 28 * 28 * 1280, 1.0), "cpu": (16, 28 * 28 * 16, 0.25), "quick": (4, 28 * 28 * 16, 0.1)}


def run(device, quick, only=None):
    cuda = is_cuda(device)
    scale = "quick" if quick else "real" if cuda else "cpu"
    sz = SIZES[scale]
    dtype = common.bench_dtype(device)
    common_row = {"suite": SUITE, "device": common.device_name(device), "dtype": common.dtype_name(dtype)}
    rows = [r for r in fill_rows(quick, common_row) if only is None or re.search(only, r["case"])]
    n, max_pixels, text_scale = SCALES[scale]
    draws = llava_like(n, seed=0, max_pixels=max_pixels, text_scale=text_scale)
    vocab = sz.qwen2["vocab_size"]
    ours_config, hf_config = configs(sz, vocab)
    vision, text = ours_config.vision_config, ours_config.text_config
    samples = make_samples(draws, vocab, vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2,
                           torch.Generator().manual_seed(0))
    lengths = [s["input_ids"].numel() for s in samples]
    budget = max(max(lengths), BATCH * round(sum(lengths) / n))
    images = sum(grid is not None for _, grid in draws)
    case = (f"step: {n} samples, {sum(lengths)} LLM tokens, {images} images, B={BATCH} or N={budget}; ViT "
            f"{vision.depth}x{vision.embed_dim}, LLM {text.num_hidden_layers}x{text.hidden_size}"
            + ("" if cuda else " [cpu, scaled]"))
    if only is not None and not re.search(only, case):
        return rows
    batches = {"padded": micro_batches(samples), "packed": micro_batches(samples, budget)}
    items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches["packed"])
    base = {**common_row, "case": case, "samples": n, "tokens": sum(lengths), "images": images}
    plan = common.Budget(warmup=0, repeat=2) if quick else common.Budget(warmup=1, repeat=3)  # whole steps: few
    backend = common.user_backend(device)
    hf = f"hf-{hf_attention(device)}"
    useful, step_rows, steps = None, [], {}
    bar = common.progress(IMPLS.runnable(device), SUITE)
    for impl in bar:
        name = hf if impl.name == "hf" else impl.name
        bar.set_postfix_str(name)
        row = {**base, "impl": name, "micro_batches": len(batches[impl.fn]),
               "backend": None if impl.name == "hf" else backend, "padding_pct": 100 * padding(batches[impl.fn])}
        try:
            torch.manual_seed(0)
            with fastvl.use_backend(backend):
                model = build(name, ours_config, hf_config, device, dtype)
            step = step_fn(model, inputs_of(name, batches[impl.fn], vocab - 1, device, dtype), items, backend)
            if name == "fastvl-packed":
                _, useful = flops.count(step)  # the step's FLOPs without padding: the useful work
            else:
                step()  # a row that fails does so here, not in the rounds of all of them
            steps[name] = step
        except Exception as exc:  # noqa: BLE001 - reported, the other rows still run
            row = common.failed_row(row, name, exc)
            common.emit(bar, row, row["skipped"])
        step_rows.append(row)
    timings = common.measure_rows({name: {"step_ms": step} for name, step in steps.items()}, device, plan)
    for row in step_rows:
        if row["impl"] in timings:
            seconds = timings[row["impl"]]["step_ms"] / 1e3
            row.update(timings[row["impl"]], tokens_s=row["tokens"] / seconds, samples_s=n / seconds,
                       images_s=images / seconds, peak_mb=common.peak_memory_mb(steps[row["impl"]], device))
    steps = model = step = None  # the models, freed before the matmul peak is measured
    if cuda:
        torch.cuda.empty_cache()
    peak = common.matmul_tflops(device, plan, n=8192 if cuda else 512)
    timed = common.measured(step_rows)
    common.speedups(timed, hf, "step_ms")  # the tokens of every row are the same: the ratio of their tokens/s
    baseline = next((r for r in timed if r["impl"] == hf), None)
    for r in timed:
        if useful:
            r.update(mfu=useful / (r["step_ms"] / 1e3) / (peak * 1e12), useful_tflop=useful / 1e12, peak_tflops=peak)
        if baseline and r["peak_mb"] is not None:
            r["mem_ratio"] = r["peak_mb"] / baseline["peak_mb"]
        common.emit(bar, r, f"{common.fmt_time(r['step_ms'])} per step, {common.sig3(r['tokens_s'])} tokens/s")
    return rows + step_rows


def summary(rows):
    lines = []
    for r in common.measured(rows):
        if r["impl"].startswith("packed") and "unfilled_pct" in r:
            lines.append(f"train padding in packed micro-batches, {r['impl']} on the {r['case']}: "
                         f"{common.sig3(r['unfilled_pct'])}% of the budget unfilled (target < {TARGET_PADDING_PCT}%): "
                         f"{'met' if r['unfilled_pct'] < TARGET_PADDING_PCT else 'NOT MET'}")
        if r["impl"] == "fastvl-packed" and r.get("vs"):
            lines.append(common.target(f"train {r['case']}: fastvl-packed tokens/s vs {r['vs']}", r["speedup"],
                                       TARGET_SPEEDUP))
            if r.get("mem_ratio") is not None:
                lines.append(common.target(f"train {r['case']}: fastvl-packed peak memory vs {r['vs']}",
                                           r["mem_ratio"], TARGET_MEMORY, at_most=True))
        if r.get("mfu") is not None:
            lines.append(f"train {r['impl']}: MFU {100 * r['mfu']:.3g}% ({common.sig3(r['useful_tflop'])} useful TFLOP "
                         f"per step over a measured {common.sig3(r['peak_tflops'])} TFLOP/s matmul peak)")
    return lines


def plot(rows, path):
    steps = [r for r in common.measured(rows) if "step_ms" in r]
    panels = (("tokens_s", "LLM tokens/s"), ("peak_mb", "peak memory above the weights (MiB)"))
    return common.bar_plot(steps, path, panels, {k: t for k, t in panels}, "VLM training step")


def main(argv=None):
    from . import suite_main

    return suite_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
