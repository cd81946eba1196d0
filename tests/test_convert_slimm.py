"""SliMM releases -> FastVL (``fastvl convert --from slimm``) against an independent re-implementation of SliMM's
forward, in float64.

The re-implementation follows MengLcool/SliMM at 18dfba4 (slimm/model/slimm.py, language_model/qwen2vl.py,
vision_encoder/dfn_vit.py and merger.py): transformers' Qwen2-VL ViT blocks and Qwen2-VL text model (what SliMM
subclasses), SliMM's mergers, its DeepStack-Efficient pixel re-layout, its get_rope_index and its decoder loop with
the DeepStack additions. The synthetic checkpoints carry the released key names, shapes and config files
(``released_keys``, ``*_CONFIG``), at tiny sizes.
"""
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import Qwen2VLTextConfig, Qwen2VLTextModel
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from fastvl.cli import main as cli
from fastvl.data import NativeResolutionProcessor
from fastvl.models import FastVLForConditionalGeneration
from fastvl.testing import assert_close, generator, randn

TOL = 1e-6  # transformers' fp32 ViT RoPE tables bound float64 agreement at ~1e-7
START, END, PAD_ID, IMAGE, VIDEO = 50, 51, 52, 53, 54
TAPS = [8, 16, 24, 30]  # dfn_vit.py: feature_idxs, whatever the depth
E, F, D, I, V, LAYERS = 64, 128, 128, 128, 64, 5  # ViT width, ViT MLP, LLM width (head_dim 64), LLM MLP, vocab

# config.json of the releases (menglc/SliMM-*), tiny. SliMM-Qwen2-0.5B / DeepStackM: a Qwen2-0.5B config saved by
# SliMMForConditionalGeneration (rope_scaling overwritten with M-RoPE sections, Qwen2-VL's special ids added), the
# ViT named by custom_visual_model; DeepStackE-Qwen2VL-2B: Qwen2-VL-2B's flat config (4.47) with the vision config
# inline, where fields equal to their defaults (hidden_act, patch_size) are left out.
QWEN2_CONFIG = {
    "architectures": ["SliMMForConditionalGeneration"], "model_type": "qwen2", "hidden_size": D,
    "intermediate_size": I, "num_hidden_layers": LAYERS, "num_attention_heads": 2, "num_key_value_heads": 1,
    "vocab_size": V, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "hidden_act": "silu", "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 4096,
    "max_window_layers": LAYERS, "attention_dropout": 0.0, "bos_token_id": 48, "eos_token_id": 49,
    "rope_scaling": {"type": "default", "mrope_section": [8, 12, 12], "rope_type": "default"},
    "vision_start_token_id": START, "vision_end_token_id": END, "vision_token_id": PAD_ID, "image_token_id": IMAGE,
    "video_token_id": VIDEO, "use_deepstack": False, "deepstack_type": "v1", "global_interval": None,
    "use_mrope": True, "custom_visual_model": "menglc/DFN-Huge-Qwen2VL-7B", "spatial_merge_size": 2,
    "temporal_patch_size": 2, "torch_dtype": "float64", "transformers_version": "4.47.0.dev0", "use_cache": True,
}
DEEPSTACKM_CONFIG = {**QWEN2_CONFIG, "use_deepstack": True, "deepstack_type": "midlayers"}
DFN_CONFIG = {  # menglc/DFN-Huge-Qwen2VL-7B: a Qwen2-VL vision config (4.47 named it model_type qwen2_vl)
    "model_type": "qwen2_vl", "depth": 32, "embed_dim": E, "hidden_size": 3584, "hidden_act": "quick_gelu",
    "mlp_ratio": F // E, "num_heads": 1, "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
DEEPSTACKE_CONFIG = {
    "architectures": ["SliMMForConditionalGeneration"], "model_type": "qwen2_vl", "hidden_size": D,
    "intermediate_size": I, "num_hidden_layers": LAYERS, "num_attention_heads": 2, "num_key_value_heads": 1,
    "vocab_size": V, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "hidden_act": "silu", "tie_word_embeddings": True, "bos_token_id": 48, "eos_token_id": 49,
    "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
    "vision_config": {"depth": 2, "embed_dim": E, "mlp_ratio": F // E, "num_heads": 1, "in_chans": 3,
                      "hidden_size": D, "spatial_patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    "vision_start_token_id": START, "vision_end_token_id": END, "vision_token_id": PAD_ID, "image_token_id": IMAGE,
    "video_token_id": VIDEO, "use_deepstack": True, "deepstack_type": "efficient", "use_mrope": True,
    "custom_visual_model": None, "spatial_merge_size": 2, "temporal_patch_size": 2, "torch_dtype": "float64",
    "transformers_version": "4.47.0.dev0",
}
DEEPSTACKE_PREPROCESSOR = {  # its preprocessor_config.json: 28-px patches
    "image_processor_type": "Qwen2VLImageProcessor", "patch_size": 28, "merge_size": 2, "temporal_patch_size": 2,
    "min_pixels": 3136, "max_pixels": 1003520, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "do_resize": True, "do_rescale": True, "do_normalize": True,
    "rescale_factor": 0.00392156862745098, "resample": 3,
}
RELEASES = {"baseline": (QWEN2_CONFIG, 2), "midlayers": (DEEPSTACKM_CONFIG, 32), "efficient": (DEEPSTACKE_CONFIG, 2)}


def released_keys(variant, depth):
    """Every key of a SliMM release and its shape (E: ViT width, D: LLM width; the lm_head is tied, not saved)."""
    keys = {"visual.patch_embed.proj.weight": (E, 3, 2, 14, 14)}  # Conv3d
    for i in range(depth):
        b = f"visual.blocks.{i}."
        keys |= {b + "norm1.weight": (E,), b + "norm1.bias": (E,), b + "norm2.weight": (E,), b + "norm2.bias": (E,),
                 b + "attn.qkv.weight": (3 * E, E), b + "attn.qkv.bias": (3 * E,), b + "attn.proj.weight": (E, E),
                 b + "attn.proj.bias": (E,), b + "mlp.fc1.weight": (F, E), b + "mlp.fc1.bias": (F,),
                 b + "mlp.fc2.weight": (E, F), b + "mlp.fc2.bias": (E,)}

    def merger(ln, mlp, width, hidden):
        return {ln + ".weight": (E,), ln + ".bias": (E,), mlp + ".0.weight": (hidden, width),
                mlp + ".0.bias": (hidden,), mlp + ".2.weight": (D, hidden), mlp + ".2.bias": (D,)}

    keys |= merger("visual.merger.ln_q", "visual.merger.mlp", 4 * E, 4 * E)
    if variant == "midlayers":
        for k in range(4):
            keys |= merger(f"visual.merger.ln_q_deepstack_list.{k}", f"visual.merger.mlp_deepstack_list.{k}", 4 * E,
                           4 * E)
    if variant == "efficient":
        keys |= merger("visual.merger.ln_q_deepstack", "visual.merger.mlp_deepstack", 16 * E, 4 * E)
    keys["model.embed_tokens.weight"] = (V, D)
    for i in range(LAYERS):
        b = f"model.layers.{i}."
        keys |= {b + "self_attn.q_proj.weight": (D, D), b + "self_attn.q_proj.bias": (D,),
                 b + "self_attn.k_proj.weight": (64, D), b + "self_attn.k_proj.bias": (64,),
                 b + "self_attn.v_proj.weight": (64, D), b + "self_attn.v_proj.bias": (64,),
                 b + "self_attn.o_proj.weight": (D, D), b + "mlp.gate_proj.weight": (I, D),
                 b + "mlp.up_proj.weight": (I, D), b + "mlp.down_proj.weight": (D, I),
                 b + "input_layernorm.weight": (D,), b + "post_attention_layernorm.weight": (D,)}
    keys["model.norm.weight"] = (D,)
    return keys


# ----------------------------------------------------------------------------------- SliMM's forward, re-implemented

class Merger(nn.Module):
    """merger.py PatchMerger: per-patch LayerNorm, the m*m patches of a window concatenated, Linear-GELU-Linear."""

    def __init__(self, width, hidden, ln="ln_q", mlp="mlp"):
        super().__init__()
        self.width, self.ln, self.mlp = width, ln, mlp
        setattr(self, ln, nn.LayerNorm(E, eps=1e-6))
        setattr(self, mlp, nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, D)))

    def forward(self, x):
        return getattr(self, self.mlp)(getattr(self, self.ln)(x).reshape(-1, self.width))


class SliMMMerger(nn.Module):
    """PatchMerger, DeepStackMidLayerMerger or DeepStackEfficientMerger, parameter names as there."""

    def __init__(self, variant):
        super().__init__()
        self.variant = variant
        self.ln_q, self.mlp = nn.LayerNorm(E, eps=1e-6), Merger(4 * E, 4 * E).mlp
        if variant == "midlayers":
            self.ln_q_deepstack_list = nn.ModuleList(nn.LayerNorm(E, eps=1e-6) for _ in range(4))
            self.mlp_deepstack_list = nn.ModuleList(Merger(4 * E, 4 * E).mlp for _ in range(4))
        if variant == "efficient":
            self.ln_q_deepstack = nn.LayerNorm(E, eps=1e-6)
            self.mlp_deepstack = Merger(16 * E, 4 * E).mlp

    def forward(self, x, taps, grid):
        merged = self.mlp(self.ln_q(x).reshape(-1, 4 * E))
        if self.variant == "baseline":
            return merged, None
        if self.variant == "midlayers":  # stacked per token (L, 4, D) -> rows token-major
            stack = torch.stack([mlp(ln(t).reshape(-1, 4 * E)) for t, mlp, ln in
                                 zip(taps, self.mlp_deepstack_list, self.ln_q_deepstack_list)], 1).flatten(0, 1)
            return merged, stack
        # efficient: the 2x2 windows (28-px cells) regrouped into 56-px cells, 16 patches each -> one LLM token;
        # the merged 28-px cells, in raster order, are the stack
        cells = x.reshape(-1, 4 * E)
        index, offset = [], 0
        for t, h, w in [[t, h // 2, w // 2] for t, h, w in grid.tolist()]:  # the 28-px cell grid
            ids = torch.arange(t * h * w).view(t, h // 2, 2, w // 2, 2).permute(0, 1, 3, 2, 4).flatten()
            index.append(ids + offset)
            offset += t * h * w
        cells = cells[torch.cat(index)].reshape(-1, 4, E)
        return self.mlp_deepstack(self.ln_q_deepstack(cells).reshape(-1, 16 * E)), merged


class SliMMReference(nn.Module):
    """SliMMForConditionalGeneration's forward (eval, no cache): names match the released checkpoints."""

    def __init__(self, variant, depth, text_config):
        super().__init__()
        self.variant = variant
        vision = Qwen2VLVisionConfig(depth=depth, embed_dim=E, hidden_size=D, mlp_ratio=F // E, num_heads=1)
        vision._attn_implementation = "sdpa"
        self.visual = Qwen2VisionTransformerPretrainedModel(vision)
        self.visual.merger = SliMMMerger(variant)
        text_config._attn_implementation = "sdpa"
        self.model = Qwen2VLTextModel(text_config)
        self.lm_head = nn.Linear(D, V, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight  # tied

    def encode(self, pixels, grid):
        """process_visual_embeddings: (LLM image tokens [L, D], DeepStack groups [4, L, D] or None)."""
        if self.variant == "efficient":  # 28-px window-ordered rows -> 14-px rows on a grid twice as fine
            rows = []
            for x, (t, h, w) in zip(pixels.split((grid[:, 1] * grid[:, 2]).tolist()), grid.tolist()):
                x = x.view(t, h // 2, w // 2, 2, 2, -1).permute(0, 1, 3, 2, 4, 5).flatten(0, 4)
                rows.append(x.view(t, h, w, 6, 2, 14, 2, 14).permute(0, 1, 2, 4, 6, 3, 5, 7).flatten(0, 4).flatten(1))
            pixels, grid = torch.cat(rows), grid * torch.tensor([1, 2, 2])
        hidden = self.visual.patch_embed(pixels)
        pos = []  # (row, col) of each patch, in the rows' window order, repeated per frame
        for t, h, w in grid.tolist():
            r = torch.arange(h)[:, None].expand(h, w).reshape(h // 2, 2, w // 2, 2).permute(0, 2, 1, 3).flatten()
            c = torch.arange(w)[None].expand(h, w).reshape(h // 2, 2, w // 2, 2).permute(0, 2, 1, 3).flatten()
            pos.append(torch.stack([r, c], -1).repeat(t, 1))
        rope = self.visual.rotary_pos_emb(hidden, torch.cat(pos))
        cu = nn.functional.pad(torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0]).cumsum(0), (1, 0)).int()
        taps = []
        for i, block in enumerate(self.visual.blocks):
            if self.variant == "midlayers" and i in TAPS:
                taps.append(hidden)
            hidden = block(hidden, cu_seqlens=cu, position_embeddings=rope)
        main, stack = self.visual.merger(hidden, taps, grid)
        return main, None if stack is None else stack.view(main.shape[0], -1, D).permute(1, 0, 2)

    @staticmethod
    def rope_index(input_ids, grid, mask):
        """get_rope_index: text on one index, each image (after its vision-start token) on (t, h/2, w/2) + that
        index, the next text after the image's largest position. Padding skipped."""
        positions = torch.ones(3, *input_ids.shape, dtype=torch.int64)
        image = 0
        for b in range(input_ids.shape[0]):
            ids = input_ids[b][mask[b] == 1].tolist()
            n_images = sum(1 for i, x in enumerate(ids[:-1]) if x == START and ids[i + 1] == IMAGE)
            parts, st = [], 0
            for _ in range(n_images):
                ed = ids.index(IMAGE, st)
                t, h, w = grid[image].tolist()
                image += 1
                h, w = h // 2, w // 2
                base = parts[-1].max() + 1 if parts else 0
                parts.append(torch.arange(ed - st).expand(3, -1) + base)
                ti, hi, wi = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
                parts.append(torch.stack([ti.flatten(), hi.flatten(), wi.flatten()]) + ed - st + base)
                st = ed + t * h * w
            if st < len(ids):
                base = parts[-1].max() + 1 if parts else 0
                parts.append(torch.arange(len(ids) - st).expand(3, -1) + base)
            positions[:, b, mask[b] == 1] = torch.cat(parts, 1)
        return positions

    def forward(self, input_ids, mask, pixels=None, grid=None):
        embeds = self.model.embed_tokens(input_ids)
        stack = None
        if pixels is not None:
            image = input_ids == IMAGE
            main, stack = self.encode(pixels, grid)
            embeds[image] = main
            positions = self.rope_index(input_ids, grid, mask)
        else:
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[None].expand(3, -1, -1)
        length = input_ids.shape[1]
        allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]
        additive = torch.zeros(allowed.shape, dtype=embeds.dtype).masked_fill(~allowed, torch.finfo(embeds.dtype).min)
        rope = self.model.rotary_emb(embeds, positions)
        hidden = embeds
        for j, layer in enumerate(self.model.layers):
            if stack is not None and 1 <= j < 1 + len(stack):  # local_features_start 1, interval 1
                hidden = hidden.clone()
                hidden[image] = hidden[image] + stack[j - 1]
            hidden = layer(hidden, attention_mask=additive[:, None], position_embeddings=rope)
        return self.lm_head(self.model.norm(hidden))


def text_config(raw):
    """SliMM's Qwen2VLModel config: Qwen2-VL's text config, M-RoPE sections [8, 12, 12] at head_dim 64."""
    return Qwen2VLTextConfig(hidden_size=D, intermediate_size=I, num_hidden_layers=LAYERS, num_attention_heads=2,
                             num_key_value_heads=1, vocab_size=V, rms_norm_eps=1e-6, max_position_embeddings=4096,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]})


@pytest.fixture(scope="module", params=list(RELEASES))
def release(request, tmp_path_factory):
    """(checkpoint dir, DFN vision dir or None, reference) of a synthetic SliMM release."""
    variant = request.param
    raw, depth = RELEASES[variant]
    path = tmp_path_factory.mktemp(f"slimm-{variant}")
    torch.manual_seed(0)
    ref = SliMMReference(variant, depth, text_config(raw)).double().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.add_(torch.randn_like(p) * 0.3)
    state = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert {k: tuple(v.shape) for k, v in state.items()} == released_keys(variant, depth)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(raw))
    dfn = None
    if variant == "efficient":
        (path / "preprocessor_config.json").write_text(json.dumps(DEEPSTACKE_PREPROCESSOR))
    else:
        dfn = tmp_path_factory.mktemp("dfn")
        (dfn / "config.json").write_text(json.dumps({**DFN_CONFIG, "depth": depth}))
    return variant, path, dfn, ref


def converted(release, tmp_path):
    variant, path, dfn, ref = release
    args = ["convert", "--from", "slimm", str(path), str(tmp_path / "fastvl")]
    assert cli(args + (["--vision-model", str(dfn)] if dfn else [])) == 0
    return FastVLForConditionalGeneration.from_pretrained(tmp_path / "fastvl")


def prompts(variant):
    """A left-padded batch: one image with a question; two images of different sizes in one sample. Efficient
    grids are on 28-px patches (its processor's)."""
    grid = torch.tensor([[1, 4, 6], [1, 6, 4], [1, 2, 2]] if variant != "efficient" else
                        [[1, 4, 6], [1, 2, 4], [1, 4, 2]])
    n = (grid.prod(-1) // 4).tolist()  # one LLM token per 2x2 window of the grid
    rows = [[10, 11, START] + [IMAGE] * n[0] + [END, 12, 13, 14],
            [15, START] + [IMAGE] * n[1] + [END, 16, START] + [IMAGE] * n[2] + [END, 17, 18, 19, 20, 21]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    row = 1176 if variant != "efficient" else 4704
    return ids, mask, randn(int(grid.prod(-1).sum()), row, dtype=torch.float64, gen=generator(5)), grid


def test_converted_release_matches_slimm(release, tmp_path):
    variant, path, dfn, ref = release
    model = converted(release, tmp_path)
    config = model.config
    assert config.mrope_section == [8, 12, 12]
    if variant == "midlayers":
        assert config.vit_taps == TAPS
    if variant == "efficient":
        assert config.deepstack_order == "slimm" and config.vision_config.input_patch_size == 28
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids, mask, pixels, grid = prompts(variant)
    with torch.no_grad():
        want = ref(ids, mask, pixels, grid)
        got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid).logits
        real = mask.bool()
        assert_close(got[real], want[real], tol=TOL)
        text = torch.tensor([[30, 31, 32, 33, 34]])  # a text-only prompt
        assert_close(model(input_ids=text).logits, ref(text, torch.ones_like(text)), tol=1e-10)


def test_efficient_processor_gives_slimm_inputs(release, tmp_path):
    """fastvl's processor, read from the checkpoint, produces the original processor's 28-px rows and grid."""
    variant, path, dfn, ref = release
    if variant != "efficient":
        pytest.skip("the DeepStack-Efficient release alone has 28-px inputs")
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    image = Image.fromarray((torch.rand(120, 200, 3) * 255).byte().numpy())
    want = Qwen2VLImageProcessorPil(patch_size=28, merge_size=2, min_pixels=3136, max_pixels=1003520)(
        [image], return_tensors="pt")
    model = converted(release, tmp_path)
    from fastvl.models import image_processor

    got = image_processor(model.config, path)([image])
    assert torch.equal(got["image_grid_thw"], want["image_grid_thw"]) and got["pixel_values"].shape[1] == 4704
    assert_close(got["pixel_values"], want["pixel_values"], tol=1e-6)
    assert isinstance(image_processor(model.config, path), NativeResolutionProcessor)


def test_slimm_conversion_errors(release, tmp_path):
    variant, path, dfn, ref = release
    if dfn is None:
        pytest.skip("the Efficient release holds its vision config")
    with pytest.raises(FileNotFoundError, match="custom_visual_model"):
        FastVLForConditionalGeneration.from_pretrained(path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**RELEASES[variant][0], "use_deepstack": True,
                                                 "deepstack_type": "dense_connector"}))
    (bad / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    assert cli(["convert", str(bad), str(tmp_path / "out"), "--vision-model", str(dfn)]) == 2
