"""FlashSloth releases -> FastVL (``fastvl convert --from flashsloth``) against an independent re-implementation of
FlashSloth's forward, in float64.

The re-implementation follows codefanw/FlashSloth at 881445a (flashsloth/model/llava_arch.py, lqformer.py,
pooling.py, learnable_token.py, language_model/flashsloth.py and phi2/modeling_phi.py, multimodal_encoder/
clip_encoder.py): transformers' SigLIP without its last layer, the SAP window loop, the mlp2x_gelu projector, the
splicing of -200 image markers and <learnable> (id 50295) tokens, the question spans of extract_question_token_indices
(phi2 mode), the LQFormer before decoder layer 7 on the batch-index image, transformers' Phi. The synthetic
checkpoints carry the released key names, shapes and config files (``released_keys``, ``FLASHSLOTH_CONFIG``) at tiny
sizes; the LQFormer's 1152/576 widths are fixed in FlashSloth's code, so the ViT is 1152 wide.
"""
import json
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PhiConfig, PhiModel, SiglipVisionConfig, SiglipVisionModel

from fastvl.cli import main as cli
from fastvl.data import add_template_tokens, tokenize_conversation
from fastvl.models import FastVLForConditionalGeneration
from fastvl.testing import assert_close, generator, randn

TOL = 1e-6  # FlashSloth's LQFormer computes its logits and softmax in fp32
IMAGE_INDEX, LEARNABLE, DOT = -200, 50295, 764
C, DOWN, D, I, V, LAYERS, HEADS = 1152, 576, 64, 128, 50304, 8, 2  # ViT width (fixed), LQFormer width, Phi sizes
SIZE, GRID = 6 * 14, 6  # 6x6 patches per crop, 3x3 SAP windows -> 4 tokens
PROMPT = 32  # tokens of the system prompt and "USER: " in FlashSloth's Phi-2 tokenizer

# config.json of Tongbo/FlashSloth-3.2B (FlashSloth_HD-3.2B: "image_hd": true), tiny: a Phi-2 config (transformers
# 4.38) with LLaVA's multimodal fields; mm_vision_tower names the hub SigLIP, which FlashSloth loads and cuts.
FLASHSLOTH_CONFIG = {
    "architectures": ["FlashSlothForCausalLM"], "model_type": "flashsloth", "vocab_size": V, "hidden_size": D,
    "intermediate_size": I, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
    "resid_pdrop": 0.1, "embd_pdrop": 0.0, "attention_dropout": 0.0, "hidden_act": "gelu_new",
    "max_position_embeddings": 2048, "initializer_range": 0.02, "layer_norm_eps": 1e-5, "use_cache": True,
    "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_scaling": None, "partial_rotary_factor": 0.4,
    "qk_layernorm": False, "bos_token_id": 50256, "eos_token_id": 50256,
    "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": C,
    "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False, "image_aspect_ratio": "square", "image_hd": False,
    "tokenizer_padding_side": "right", "tokenizer_model_max_length": 3072, "tune_mm_mlp_adapter": False,
    "freeze_mm_mlp_adapter": False, "use_mm_proj": True, "image_token_index": 50297, "image_token": "<image>",
    "torch_dtype": "float64", "transformers_version": "4.38.0",
}
SIGLIP_CONFIG = dict(hidden_size=C, intermediate_size=64, num_hidden_layers=3, num_attention_heads=16,
                     image_size=SIZE, patch_size=14, vision_use_head=False)  # the tower dir: 3 layers, 2 kept


def released_keys(vision_layers=2):
    """Every key of a FlashSloth release and its shape."""
    keys = {"model.embed_tokens.weight": (V, D), "model.final_layernorm.weight": (D,),
            "model.final_layernorm.bias": (D,), "lm_head.weight": (V, D), "lm_head.bias": (V,)}
    for i in range(LAYERS):
        b = f"model.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"):
            keys |= {b + name + ".weight": (D, D), b + name + ".bias": (D,)}
        keys |= {b + "mlp.fc1.weight": (I, D), b + "mlp.fc1.bias": (I,), b + "mlp.fc2.weight": (D, I),
                 b + "mlp.fc2.bias": (D,), b + "input_layernorm.weight": (D,), b + "input_layernorm.bias": (D,)}
    v = "model.vision_tower.vision_tower.vision_model."
    keys |= {v + "embeddings.patch_embedding.weight": (C, 3, 14, 14), v + "embeddings.patch_embedding.bias": (C,),
             v + "embeddings.position_embedding.weight": (GRID * GRID, C)}
    for i in range(vision_layers):
        b = f"{v}encoder.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"):
            keys |= {b + name + ".weight": (C, C), b + name + ".bias": (C,)}
        keys |= {b + "layer_norm1.weight": (C,), b + "layer_norm1.bias": (C,), b + "layer_norm2.weight": (C,),
                 b + "layer_norm2.bias": (C,), b + "mlp.fc1.weight": (64, C), b + "mlp.fc1.bias": (64,),
                 b + "mlp.fc2.weight": (C, 64), b + "mlp.fc2.bias": (C,)}
    keys |= {"model.pooling.mlp.0.weight": (C, C), "model.pooling.mlp.0.bias": (C,),
             "model.pooling.mlp.3.weight": (1, C), "model.pooling.mlp.3.bias": (1,),
             "model.mm_projector.0.weight": (D, C), "model.mm_projector.0.bias": (D,),
             "model.mm_projector.2.weight": (D, D), "model.mm_projector.2.bias": (D,),
             "model.learnable_tokens.token": (9, D)}
    q = "model.lqformer."
    keys |= {q + "down_projector_learnable_text.weight": (DOWN, D), q + "down_projector_learnable_text.bias": (DOWN,),
             q + "down_projector_image.weight": (DOWN, C), q + "down_projector_image.bias": (DOWN,),
             q + "up_projector.weight": (D, C), q + "up_projector.bias": (D,)}
    for attn, value in (("t2q_attn", DOWN), ("i2q_attn", C)):
        for name, width in (("q_proj", DOWN), ("k_proj", DOWN), ("v_proj", value)):
            keys |= {f"{q}layers.0.{attn}.{name}.weight": (width, width), f"{q}layers.0.{attn}.{name}.bias": (width,)}
    for ln in ("ln_text", "ln_q", "ln_kv"):
        keys |= {f"{q}layers.0.{ln}.weight": (DOWN,), f"{q}layers.0.{ln}.bias": (DOWN,)}
    return keys


# ------------------------------------------------------------------------------ FlashSloth's forward, re-implemented

class LQAttention(nn.Module):
    """lqformerattention: q/k at the bottleneck width, v at the value width, fp32 logits and softmax, masked keys
    at -1e4 (valid ones +1), no output projection."""

    def __init__(self, value_dim):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(DOWN, DOWN), nn.Linear(DOWN, DOWN)
        self.v_proj = nn.Linear(value_dim, value_dim)

    def forward(self, query, key, value, mask=None):
        b, lq, lk = query.shape[0], query.shape[1], key.shape[1]
        q = self.q_proj(query).view(b, lq, HEADS, -1).transpose(1, 2)
        k = self.k_proj(key).view(b, lk, HEADS, -1).transpose(1, 2)
        v = self.v_proj(value).view(b, lk, HEADS, -1).transpose(1, 2)
        w = q.float() @ k.float().transpose(2, 3) / math.sqrt(DOWN // HEADS)
        if mask is not None:
            w = w + mask.masked_fill(mask == 0, -1e4)
        w = torch.softmax(w, -1, dtype=torch.float32).to(value.dtype)
        return (w @ v).transpose(1, 2).reshape(b, lq, -1)


class LQLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.t2q_attn, self.i2q_attn = LQAttention(DOWN), LQAttention(C)
        self.ln_text, self.ln_q, self.ln_kv = (nn.LayerNorm(DOWN) for _ in range(3))


class LQFormer(nn.Module):
    def __init__(self):
        super().__init__()
        self.down_projector_learnable_text = nn.Linear(D, DOWN)
        self.down_projector_image = nn.Linear(C, DOWN)
        self.layers = nn.ModuleList([LQLayer()])
        self.up_projector = nn.Linear(C, D)

    def forward(self, learnable, image, text, text_mask):
        layer = self.layers[0]
        q = layer.ln_q(self.down_projector_learnable_text(learnable))
        t = layer.ln_text(self.down_projector_learnable_text(text))
        mask = text_mask[:, None, None, :].repeat(1, HEADS, q.shape[1], 1)
        u = layer.t2q_attn(q, t, t, mask)
        o = layer.i2q_attn(u, layer.ln_kv(self.down_projector_image(image)), image)
        return learnable + self.up_projector(o)


class Inner(nn.Module):
    """FlashSlothModel: Phi-2's modules plus the multimodal ones, named as in the checkpoints."""

    def __init__(self, phi, siglip):
        super().__init__()
        self.embed_tokens, self.layers, self.final_layernorm, self.rotary_emb = (
            phi.embed_tokens, phi.layers, phi.final_layernorm, phi.rotary_emb)
        self.vision_tower = nn.Module()
        self.vision_tower.vision_tower = nn.Module()
        self.vision_tower.vision_tower.vision_model = siglip
        self.pooling = nn.Module()
        self.pooling.mlp = nn.Sequential(nn.Linear(C, C), nn.ReLU(), nn.Dropout(0.1), nn.Linear(C, 1))
        self.mm_projector = nn.Sequential(nn.Linear(C, D), nn.GELU(), nn.Linear(D, D))
        self.learnable_tokens = nn.Module()
        self.learnable_tokens.token = nn.Parameter(torch.randn(9, D) / math.sqrt(D))
        self.lqformer = LQFormer()


class FlashSlothReference(nn.Module):
    def __init__(self):
        super().__init__()
        phi = PhiModel(PhiConfig(**{k: v for k, v in FLASHSLOTH_CONFIG.items() if k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "layer_norm_eps", "rope_theta", "partial_rotary_factor")}))
        phi.config._attn_implementation = "sdpa"
        siglip = SiglipVisionModel(SiglipVisionConfig(**SIGLIP_CONFIG))
        del siglip.encoder.layers[-1:]  # mm_vision_select_layer -2
        siglip.post_layernorm = nn.Identity()
        self.model = Inner(phi, siglip)
        self.lm_head = nn.Linear(D, V)

    def sap(self, x):
        """AttentionPooling: softmax of the score MLP within each 3x3 window, score-weighted sum; row-major."""
        n, tokens, dim = x.shape
        side = int(tokens ** 0.5)
        x = x.view(n, side, side, dim)
        out = []
        for i in range(0, side, 3):
            for j in range(0, side, 3):
                region = x[:, i:i + 3, j:j + 3].reshape(n, -1, dim)
                out.append((torch.softmax(self.model.pooling.mlp(region), 1) * region).sum(1))
        return torch.stack(out, 1)

    def encode(self, images):
        """(projected pooled tokens per image [n, 4 (HD 20), D], raw ViT tokens per image [n, 36 (HD 180), C])."""
        crops = images.flatten(0, 1) if images.dim() == 5 else images
        raw = self.model.vision_tower.vision_tower.vision_model(crops).last_hidden_state
        pooled = self.model.mm_projector(self.sap(raw))
        if images.dim() == 5:
            per = images.shape[1]
            return pooled.view(-1, per * pooled.shape[1], D), raw.reshape(-1, per * raw.shape[1], C)
        return pooled, raw

    def run_layers(self, embeds, mask, lqformer=None):
        length = embeds.shape[1]
        allowed = torch.ones(length, length, dtype=torch.bool).tril()[None]
        if mask is not None:
            allowed = allowed & mask.bool()[:, None, :]
        additive = torch.zeros(allowed.shape, dtype=embeds.dtype).masked_fill(~allowed, torch.finfo(embeds.dtype).min)
        rope = self.model.rotary_emb(embeds, torch.arange(length)[None])
        hidden = embeds
        for idx, layer in enumerate(self.model.layers):
            if idx + 1 == 8 and lqformer is not None:
                hidden = lqformer(hidden)
            hidden = layer(hidden, attention_mask=additive[:, None], position_embeddings=rope)
        return self.lm_head(self.model.final_layernorm(hidden))

    def forward(self, input_ids, images=None):
        """Logits of ``input_ids``, unpadded rows of ids with -200 per image and 50295 per query block (a list of
        lists), right-padded as FlashSloth pads them."""
        embed = self.model.embed_tokens
        if images is None:  # phi2 mode without images: plain Phi-2, <learnable> an ordinary token
            return self.run_layers(embed(torch.tensor(input_ids)), None)
        features, origin = self.encode(images)
        queries = self.model.learnable_tokens.token + embed(torch.full((9,), DOT))
        rows, places, image = [], [], 0
        for ids in input_ids:
            parts, place, pos, has_image = [], [], 0, False
            for token in ids:
                if token == IMAGE_INDEX:
                    parts.append(features[image])
                    image += 1
                    has_image = True
                elif token == LEARNABLE:
                    place.append(pos)
                    parts.append(queries)
                else:
                    parts.append(embed(torch.tensor([token])))
                pos += parts[-1].shape[0]
            rows.append(torch.cat(parts))
            # extract_question_token_indices (phi2 mode, no labels at inference): every block reads the first span
            start = PROMPT + features.shape[1] + 1 if has_image else PROMPT
            places.append((place, [(start, place[0] if place else start)] * len(place), has_image))
        width = max(r.shape[0] for r in rows)
        embeds = torch.stack([torch.cat([r, r.new_zeros(width - r.shape[0], D)]) for r in rows])
        mask = torch.tensor([[1] * r.shape[0] + [0] * (width - r.shape[0]) for r in rows])

        def lqformer(hidden):
            longest = max(e - s for _, spans, _ in places for s, e in spans)
            learn, imgs, texts, masks = [], [], [], []
            for b, (place, spans, _) in enumerate(places):
                for p, (s, e) in zip(place, spans):
                    text = hidden[b, s:e]
                    learn.append(hidden[b, p:p + 9])
                    imgs.append(origin[b])  # the batch index's image
                    texts.append(torch.cat([text, text.new_zeros(longest - text.shape[0], D)]))
                    masks.append(torch.tensor([1.0] * text.shape[0] + [0.0] * (longest - text.shape[0]),
                                              dtype=hidden.dtype))
            out = self.model.lqformer(torch.stack(learn), torch.stack(imgs), torch.stack(texts), torch.stack(masks))
            hidden = hidden.clone()
            k = 0
            for b, (place, _, has_image) in enumerate(places):
                for p in place:
                    hidden[b, p:p + 9] = out[k] if has_image else hidden[b, p:p + 9] + 0 * out[k]
                    k += 1
            return hidden

        return self.run_layers(embeds, mask, lqformer)


def expand(ids, per_image, image_id):
    """fastvl's ids of a FlashSloth prompt: each -200 -> the image's LLM tokens, each <learnable> -> 9."""
    out = []
    for token in ids:
        out += [image_id] * per_image if token == IMAGE_INDEX else [LEARNABLE] * 9 if token == LEARNABLE else [token]
    return out


def flashsloth_tokenizer():
    """A word-level tokenizer with FlashSloth's <learnable> at 50295 (Phi-2's vocabulary size is 50295)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AddedToken, PreTrainedTokenizerFast

    specials = ["<unk>", "USER:", "ASSISTANT:", "what", "is", "this", "?"]
    words = {w: i for i, w in enumerate(specials)} | {f"w{i}": i for i in range(len(specials), LEARNABLE)}
    model = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>")
    tok.add_tokens([AddedToken("<learnable>", special=True, normalized=False)], special_tokens=True)
    return tok


@pytest.fixture(scope="module", params=[False, True], ids=["FlashSloth", "FlashSloth_HD"])
def release(request, tmp_path_factory):
    """(checkpoint dir, SigLIP dir, reference, converted FastVL model)."""
    hd = request.param
    path = tmp_path_factory.mktemp("flashsloth")
    torch.manual_seed(0)
    ref = FlashSlothReference().double().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.3)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == released_keys()
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({**FLASHSLOTH_CONFIG, "image_hd": hd}))
    flashsloth_tokenizer().save_pretrained(path)
    siglip = tmp_path_factory.mktemp("siglip")
    SiglipVisionModel(SiglipVisionConfig(**SIGLIP_CONFIG)).save_pretrained(siglip)
    out = tmp_path_factory.mktemp("fastvl")
    assert cli(["convert", "--from", "flashsloth", str(path), str(out), "--vision-model", str(siglip)]) == 0
    return path, siglip, ref, FastVLForConditionalGeneration.from_pretrained(out), out


def prefix(seed):
    return torch.randint(800, 50000, (PROMPT,), generator=generator(seed)).tolist()  # system prompt + "USER: "


NL, ASSISTANT = 198, 35  # "\n", " ASSISTANT:" pieces


def test_converted_release_matches_flashsloth(release):
    path, _, ref, model, _ = release
    config = model.config
    assert (config.embq_question_start, config.embq_without_image, config.embq_image) == (32, "plain", "batch_index")
    hd = config.image_hd
    per_image = 20 if hd else 4
    if hd:  # one image with a question
        prompts = [prefix(1) + [IMAGE_INDEX, NL, 501, 502, 503, LEARNABLE, ASSISTANT, 25]]
    else:  # two images in one sample (the second read by sample 1's queries), two query blocks in the other
        prompts = [prefix(1) + [IMAGE_INDEX, NL, IMAGE_INDEX, NL, 501, 502, 503, 504, LEARNABLE, ASSISTANT, 25],
                   prefix(2) + [IMAGE_INDEX, NL, 601, 602, LEARNABLE, ASSISTANT, 25, 700, 701, 702, 703, LEARNABLE,
                                ASSISTANT]]
    images = sum(p.count(IMAGE_INDEX) for p in prompts)
    crops = randn(images * (5 if hd else 1), 3, SIZE, SIZE, dtype=torch.float64, gen=generator(7))
    with torch.no_grad():
        want = ref(prompts, crops.view(images, 5, 3, SIZE, SIZE) if hd else crops)
        rows = [expand(p, per_image, config.image_token_id) for p in prompts]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])  # FlashSloth pads on the right
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        got = model(input_ids=ids, attention_mask=mask, pixel_values=crops).logits
    assert want.shape == got.shape
    assert_close(got[mask.bool()], want[mask.bool()], tol=TOL)


@pytest.mark.parametrize("learnable", [True, False], ids=["with-learnable", "without"])
def test_text_only_prompt_runs_plain_phi2(release, learnable):
    _, _, ref, model, _ = release
    ids = prefix(3) + [501, 502] + ([LEARNABLE] if learnable else []) + [ASSISTANT]
    with torch.no_grad():
        want = ref([ids])
        got = model(input_ids=torch.tensor([ids])).logits
        empty = model(input_ids=torch.tensor([ids]), pixel_values=torch.zeros(0, 3, SIZE, SIZE)).logits
    assert_close(got, want, tol=1e-10)
    assert torch.equal(empty, got)


def test_generate_uses_flashsloth_template_and_tokens(release, tmp_path):
    path, _, _, model, out = release
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<learnable>") == LEARNABLE == model.config.query_token_id
    assert tok.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert model.config.chat_template == "phi2"
    from PIL import Image

    image = tmp_path / "image.png"
    Image.fromarray((torch.rand(50, 80, 3) * 255).byte().numpy()).save(image)
    assert cli(["generate", "--model", str(out), "--image", str(image), "--prompt", "what is this ?",
                "--max-new-tokens", "2"]) == 0


def test_phi2_template_tokenizes_as_flashsloth():
    """fastvl's phi2 prompt == FlashSloth's training prompt through tokenizer_image_token (chunks split at <image>,
    each tokenized whole), -200 expanded to the image's tokens and <learnable> to 9, with a byte-pair tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fastvl.data.conversation import PHI2_SYSTEM

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([PHI2_SYSTEM + " USER: What is this? ASSISTANT: A cat."] * 5, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    add_template_tokens(tok, "phi2")
    prompt = PHI2_SYSTEM + " USER: <image>\nWhat is this? <learnable> ASSISTANT:"  # conv_phi2, as in training
    chunks = [tok(c, add_special_tokens=False)["input_ids"] for c in prompt.split("<image>")]
    original = chunks[0] + [IMAGE_INDEX] + chunks[1]
    image_id, query_id = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<learnable>")
    want = [t for x in original for t in ([image_id] * 7 if x == IMAGE_INDEX else [query_id] * 9 if x == query_id
                                          else [x])]
    turn = [{"role": "user", "content": "<image>\nWhat is this?"}]
    assert tokenize_conversation(turn, tok, "phi2", [7], 9)["input_ids"].tolist() == want
