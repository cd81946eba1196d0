"""Whole vision-language models with random weights: FLOPs, prefill latency, decode throughput, peak memory.

The efficiency table of the FlashSloth paper, for models built from configs on the public API
(``FastVLConfig`` / ``FastVLForConditionalGeneration``, ``fastvl.patch``), one image and one prompt per model:

- ``flashsloth``: a SigLIP-so400m tower (27x27 patches per 384 px crop) + a Phi-2-sized LLM. ``uncompressed``
  (every one of the 729 ViT tokens in the LLM, the IMP-style baseline), ``sap+embq`` (SAP 729 -> 81 with
  EmbQ) and ``hd sap+embq`` (5 crops: 405 tokens);
- ``slimm``: a Qwen2-VL-2B-sized tower + a Qwen2-0.5B-sized LLM on the same image: ``patch_merge`` (the
  baseline), ``deepstack-midlayers`` (same tokens, 4 ViT taps added in LLM layers 1-4),
  ``deepstack-efficient`` (4x fewer LLM tokens, 4 stacked groups);
- ``qwen2-vl``: Hugging Face ``Qwen2VLForConditionalGeneration`` at 2B size, ``stock`` (sdpa) against
  ``fastvl.patch`` (vision tower on fastvl ops) and ``fastvl.patch+text`` (the LLM on fastvl attention too).

Per row: ``tflops`` the FLOPs (an amount, in TFLOP) of one prefill — vision tower, compressor and LLM over
the prompt, logits of the last token — counted by FlopCounterMode (``flops.py``: attention included);
``prefill_ms`` that forward's latency; ``decode_tok_s`` greedy decoding with the KV cache, batch 1
(32 timed decode steps on a GPU, 16 on a CPU, after one untimed step; ``decode_ms`` per token);
``peak_mb`` the peak GPU memory of a whole ``generate`` (weights included); ``image_tokens`` in the LLM;
ratios against the family's baseline (``vs``). On a GPU the sizes are real and bf16; on a CPU every width
and depth is scaled down (token counts stay real: 729/81/405, the same grids), fp32, and the fastvl ops run
on the native CPU backend (the reference where fastvl._C is not built; the ``fastvl ops`` column says which).
"""
import inspect
import sys
import time
from dataclasses import dataclass

import torch

import fastvl

from . import common, flops
from .common import Registry, is_cuda

SUITE = "model"
TITLE = "whole VLMs with random weights: prefill FLOPs and latency, greedy decode tokens/s, peak memory (batch 1)"
COLUMNS = (("case", "family"), ("impl", "model"), ("backend", "fastvl ops"), ("image_tokens", "img tok"),
           ("tflops", "TFLOPs"), ("prefill_ms", "prefill (min-max)"), ("decode_tok_s", "decode tok/s"),
           ("decode_ms", "per token (min-max)"), ("peak_mb", "peak MiB"), ("vs", "vs"),
           ("flops_ratio", "FLOPs ratio"), ("speedup", "prefill speedup"), ("decode_ratio", "decode ratio"),
           ("mem_ratio", "mem ratio"))


@dataclass(frozen=True)
class Sizes:
    """Model sizes and inputs of one scale: real (GPU), cpu (scaled) or quick (tiny)."""

    siglip: dict  # FastVLVisionConfig.siglip_so400m overrides
    phi: dict  # PhiConfig
    qwen_vit: dict  # FastVLVisionConfig (native)
    qwen2: dict  # Qwen2Config (the SliMM LLM)
    hf_vision: dict  # Qwen2VLConfig.vision_config
    hf_text: dict  # Qwen2VLConfig.text_config
    grid: int  # patches per side of the native-resolution image
    text: tuple  # text tokens before the image, question after it, after the queries
    new_tokens: int  # decoded per generate
    decode_runs: int


QWEN2VL_ROPE = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}
SIZES = {
    "real": Sizes(
        siglip={},
        phi=dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=51200),
        qwen_vit={},
        qwen2=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
        hf_vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4),
        hf_text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                     num_key_value_heads=2, vocab_size=151936, rope_parameters=QWEN2VL_ROPE),
        grid=48, text=(8, 48, 8), new_tokens=32, decode_runs=3,
    ),
    "cpu": Sizes(
        siglip=dict(depth=2, embed_dim=288, num_heads=4, intermediate_size=1152),
        phi=dict(hidden_size=320, intermediate_size=1280, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=2048),
        qwen_vit=dict(depth=4, embed_dim=320, num_heads=4, intermediate_size=1280),
        qwen2=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True),
        hf_vision=dict(depth=4, embed_dim=320, hidden_size=256, num_heads=4, mlp_ratio=4),
        hf_text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=2048,
                     rope_parameters={**QWEN2VL_ROPE, "mrope_section": [8, 12, 12]}),
        grid=32, text=(4, 16, 4), new_tokens=16, decode_runs=2,
    ),
    "quick": Sizes(
        siglip=dict(depth=1, embed_dim=144, num_heads=2, intermediate_size=288),
        phi=dict(hidden_size=160, intermediate_size=320, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, vocab_size=512),
        qwen_vit=dict(depth=2, embed_dim=160, num_heads=2, intermediate_size=320),
        qwen2=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=5, num_attention_heads=2,
                   num_key_value_heads=1, vocab_size=512, tie_word_embeddings=True),
        hf_vision=dict(depth=1, embed_dim=160, hidden_size=128, num_heads=2, mlp_ratio=2),
        hf_text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=512,
                     rope_parameters={**QWEN2VL_ROPE, "mrope_section": [16, 8, 8]}),
        grid=16, text=(2, 8, 2), new_tokens=4, decode_runs=1,
    ),
}


# ------------------------------------------------------------------ models and their inputs
def _ids(gen, vocab, n):
    """Random text token ids (clear of the low and high ids used as special tokens)."""
    return torch.randint(8, vocab - 16, (n,), generator=gen).tolist()


def _fastvl(config_kwargs, text_config, vision, sz, crops=1):
    """(model builder, inputs builder) of a FastVL model; image and query tokens are the top vocabulary ids."""
    from fastvl.models import FastVLConfig, FastVLForConditionalGeneration

    vocab = text_config.vocab_size
    image_id, query_id = vocab - 1, vocab - 2
    config = FastVLConfig(vision_config=vision, text_config=text_config, image_token_id=image_id,
                          query_token_id=query_id, **config_kwargs)

    def build(device, dtype):
        with torch.device(device):
            return FastVLForConditionalGeneration._from_config(config, dtype=dtype).eval()

    def inputs(model, device, dtype, gen):
        before, question, after = sz.text
        if config.vision_config.tower == "fixed":
            size = config.vision_config.image_size
            pixels = torch.randn(crops, 3, size, size, generator=gen)
            grid, counts = None, model.num_image_tokens(pixels)
        else:
            grid = torch.tensor([[1, sz.grid, sz.grid]])
            pixels = torch.randn(sz.grid * sz.grid, model.vision_tower.patch_embed.in_features, generator=gen)
            counts = model.num_image_tokens(grid)
        queries = [query_id] * config.num_query_tokens if config.use_embq else []
        ids = _ids(gen, vocab, before) + [image_id] * sum(counts) + _ids(gen, vocab, question) + queries
        ids += _ids(gen, vocab, after)
        found = {"input_ids": torch.tensor([ids], device=device), "pixel_values": pixels.to(device, dtype)}
        if grid is not None:
            found["image_grid_thw"] = grid.to(device)
        return found, sum(counts)

    return build, inputs


def _phi(sz):
    from transformers import PhiConfig

    return PhiConfig(**sz.phi, partial_rotary_factor=0.4)


def _siglip(sz):
    from fastvl.models import FastVLVisionConfig

    return FastVLVisionConfig.siglip_so400m(**sz.siglip)


def _qwen_vit(sz):
    from fastvl.models import FastVLVisionConfig

    return FastVLVisionConfig(**sz.qwen_vit)


def _qwen2(sz):
    from transformers import Qwen2Config

    return Qwen2Config(**sz.qwen2, rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def flashsloth(compressor, hd=False):
    def make(sz):
        phi = _phi(sz)
        kwargs = dict(compressor=compressor, chat_template="phi2", image_hd=hd, use_embq=compressor == "sap",
                      embq_layer=min(7, phi.num_hidden_layers - 1))
        return _fastvl(kwargs, phi, _siglip(sz), sz, crops=5 if hd else 1)
    return make


def slimm(compressor, deepstack_type="midlayers"):
    def make(sz):
        return _fastvl(dict(compressor=compressor, deepstack_type=deepstack_type), _qwen2(sz), _qwen_vit(sz), sz)
    return make


def qwen2_vl(patch=None):
    """Hugging Face Qwen2-VL; ``patch``: None (stock), "vision" or "vision+text" (fastvl.patch)."""
    def make(sz):
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vocab = sz.hf_text["vocab_size"]
        tokens = dict(image_token_id=vocab - 1, video_token_id=vocab - 2, vision_start_token_id=vocab - 3,
                      vision_end_token_id=vocab - 4)
        config = Qwen2VLConfig(text_config=dict(sz.hf_text, tie_word_embeddings=True), vision_config=sz.hf_vision,
                               **tokens)
        config._attn_implementation = "sdpa"

        def build(device, dtype):
            with torch.device(device):
                model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype).eval()
            if patch:
                fastvl.patch(model, text_attention=patch == "vision+text")
            return model

        def inputs(model, device, dtype, gen):
            before, question, after = sz.text
            n = sz.grid * sz.grid // 4
            ids = _ids(gen, vocab, before) + [tokens["vision_start_token_id"]] + [tokens["image_token_id"]] * n
            ids += [tokens["vision_end_token_id"]] + _ids(gen, vocab, question + after)
            ids = torch.tensor([ids], device=device)
            pixels = torch.randn(sz.grid * sz.grid, 3 * 2 * 14 * 14, generator=gen).to(device, dtype)
            found = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
                     "image_grid_thw": torch.tensor([[1, sz.grid, sz.grid]], device=device)}
            if "mm_token_type_ids" in inspect.signature(type(model).forward).parameters:  # not in older transformers
                found["mm_token_type_ids"] = (ids == tokens["image_token_id"]).int()
            return found, n

        return build, inputs
    return make


# family -> its models (a registry each: adding a row is one ``register`` line); the first is the baseline
FAMILIES = {"flashsloth": Registry(), "slimm": Registry(), "qwen2-vl": Registry()}
FAMILIES["flashsloth"].register("uncompressed", flashsloth("none"))
FAMILIES["flashsloth"].register("sap+embq", flashsloth("sap"))
FAMILIES["flashsloth"].register("hd sap+embq", flashsloth("sap", hd=True))
FAMILIES["slimm"].register("patch_merge", slimm("patch_merge"))
FAMILIES["slimm"].register("deepstack-midlayers", slimm("deepstack", "midlayers"))
FAMILIES["slimm"].register("deepstack-efficient", slimm("deepstack", "efficient"))
FAMILIES["qwen2-vl"].register("stock", qwen2_vl())
FAMILIES["qwen2-vl"].register("fastvl.patch", qwen2_vl("vision"))
FAMILIES["qwen2-vl"].register("fastvl.patch+text", qwen2_vl("vision+text"))
IMPLS = Registry(impl for family in FAMILIES.values() for impl in family)  # what --list and the CPU line show
FAMILY_LABEL = {"flashsloth": "FlashSloth (SigLIP-so400m + Phi-2)", "slimm": "SliMM (Qwen2-VL-2B ViT + Qwen2-0.5B)",
                "qwen2-vl": "HF Qwen2-VL-2B"}


# ------------------------------------------------------------------ measurement
class _Clock:
    """A ``generate`` streamer that timestamps every new token (reading it synchronises the device)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        value.tolist()
        self.times.append(time.perf_counter())

    def end(self):
        pass


class _Model:
    """One model of a family on its prompt and image, with fastvl's ops on ``backend``: what its row times."""

    def __init__(self, impl, sz, device, dtype, backend):
        build, make_inputs = impl.fn(sz)
        torch.manual_seed(0)
        with fastvl.use_backend(backend):
            self.model = build(device, dtype)
            self.inputs, self.image_tokens = make_inputs(self.model, device, dtype, torch.Generator().manual_seed(0))
        self.backend = backend
        self.steps = sz.new_tokens + 2  # the first new token comes from the prefill, the first decode step warms up

    def prefill(self):
        # without autograd, as generate() (the fastvl attention of an LLM does not take inference tensors)
        with torch.no_grad(), fastvl.use_backend(self.backend):
            return self.model(**self.inputs, use_cache=True, logits_to_keep=1)

    def decode_ms(self):
        """Per new token of a greedy ``generate``: the streamer sees the prompt, then each new token (the first
        from the prefill); the first decode step is a warm-up, the time from new token 2 to new token N is timed."""
        clock = _Clock()
        with fastvl.use_backend(self.backend):
            self.model.generate(**self.inputs, max_new_tokens=self.steps, min_new_tokens=self.steps, do_sample=False,
                                streamer=clock)
        return (clock.times[-1] - clock.times[2]) * 1e3 / (self.steps - 2)

    def weights_mb(self):
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def measure_family(family, impls, sz, device, plan, bar):
    """The rows of a family's models: every model is built first, then their prefills are timed in the same rounds
    and their decodes in rounds too; a model that fails to build or to prefill is a row with the reason, and so is
    every model of the family when their timing fails."""
    dtype = common.bench_dtype(device)
    common_row = {"suite": SUITE, "case": family, "device": common.device_name(device),
                  "dtype": common.dtype_name(dtype), "scale": "real" if sz is SIZES["real"] else "scaled"}
    rows, models = [], {}
    for impl in impls:
        base = {**common_row, "impl": impl.name}
        try:
            model = _Model(impl, sz, device, dtype, impl.backend or common.user_backend(device))
            _, flop = flops.count(model.prefill)
        except Exception as exc:  # noqa: BLE001 - a model that fails is reported, the others still run
            rows.append(common.failed_row(base, impl.name, exc))
            common.emit(bar, rows[-1], rows[-1]["skipped"])
            continue
        models[impl.name] = model
        rows.append({**base, "backend": model.backend, "image_tokens": model.image_tokens,
                     "prompt_tokens": model.inputs["input_ids"].shape[1], "new_tokens": sz.new_tokens,
                     "params_m": sum(p.numel() for p in model.model.parameters()) / 1e6, "tflops": flop / 1e12,
                     "gflop": flop / 1e9})
    try:
        found = _time(models, common.measured(rows), sz, device, plan)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory with the family's models together: reported
        failed = [common.failed_row(common_row, name, exc) for name in models]
        for row in failed:
            common.emit(bar, row, row["skipped"])
        return [r for r in rows if "skipped" in r] + failed
    _ratios(found, FAMILIES[family][0].name)
    for row in found:
        common.emit(bar, row, f"{row['tflops']:.3g} TFLOPs, prefill {common.fmt_time(row['prefill_ms'])}, "
                    f"decode {common.sig3(row['decode_tok_s'])} tok/s")
    return rows


def _time(models, rows, sz, device, plan):
    """Adds the prefill, decode and peak-memory entries of ``models`` ({name: _Model}) to their ``rows``."""
    timed = common.measure_rows({name: {"prefill_ms": m.prefill} for name, m in models.items()}, device, plan)
    per_token = {name: [] for name in models}
    for _ in range(sz.decode_runs):  # each round decodes with every model in turn, as measure_rows times
        for name, model in models.items():
            per_token[name].append(model.decode_ms())
    for row in rows:
        model = models[row["impl"]]
        row.update(timed[row["impl"]])
        row.update(common.Timing(tuple(per_token[row["impl"]])).row("decode_ms"))
        row["decode_tok_s"] = 1e3 / row["decode_ms"]
        # the weights, and above them what generate allocates (the family's other models are not counted)
        peak = common.peak_memory_mb(model.decode_ms, device)
        row["peak_mb"] = None if peak is None else model.weights_mb() + peak
    return rows


def _ratios(rows, baseline):
    """Against the family's baseline: FLOPs, prefill speedup and decode tokens/s (per-round ratios), memory."""
    common.speedups(rows, baseline, "prefill_ms")
    common.speedups(rows, baseline, "decode_ms", name="decode_ratio")
    base = next((r for r in rows if r["impl"] == baseline), None)
    for r in rows if base else ():
        r["flops_ratio"] = r["tflops"] / base["tflops"]
        if r["peak_mb"] is not None:
            r["mem_ratio"] = r["peak_mb"] / base["peak_mb"]


def run(device, quick, only=None):
    """One row per model of every family ("case" = family, "impl" = model); failures are rows with a reason."""
    import re

    sz = SIZES["quick" if quick else "real" if is_cuda(device) else "cpu"]
    plan = common.budget(device, quick)
    work = {}
    for family, registry in FAMILIES.items():
        impls = [i for i in registry.runnable(device) if only is None or re.search(only, f"{family} {i.name}")]
        if impls:
            work[family] = impls
    rows = []
    bar = common.progress(work, SUITE)
    for family in bar:
        bar.set_postfix_str(family)
        rows += measure_family(family, work[family], sz, device, plan, bar)
        if is_cuda(device):
            torch.cuda.empty_cache()
    return rows


def summary(rows):
    """The direction of the FlashSloth table: compression lowers FLOPs and prefill latency."""
    lines = []
    for r in common.measured(rows):
        if r.get("vs") and r["impl"] != r["vs"]:
            lines.append(f"model {r['case']} {r['impl']} vs {r['vs']}: {common.sig3(r['flops_ratio'])}x the FLOPs, "
                         f"prefill speedup {common.sig3(r['speedup'])}x, {common.sig3(r['decode_ratio'])}x the decode "
                         "tokens/s" + (f", {common.sig3(r['mem_ratio'])}x the peak memory" if r.get("mem_ratio") else ""))
    return lines


def plot(rows, path):
    panels = (("tflops", "prefill TFLOPs"), ("prefill_ms", "prefill latency (ms)"),
              ("decode_tok_s", "decode tokens/s"))
    found = [dict(r, group=f"{r['case']}\n{r['impl']}") for r in common.measured(rows)]
    for r in found:
        r["impl"] = r["case"]
    return common.bar_plot(found, path, panels, {k: t for k, t in panels}, "whole models", group="group")


def main(argv=None):
    from . import suite_main

    return suite_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
