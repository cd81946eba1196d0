"""FastVLForConditionalGeneration: vision tower -> compressor -> any Hugging Face causal LM."""
import torch
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init

from .. import ops
from ..nn import DeepStack
from ..nn.modules import replace_hidden
from .compressor import build_compressor
from .configuration import FastVLConfig
from .embq import EmbQ
from .vision import build_vision_tower


class FastVLPreTrainedModel(PreTrainedModel):
    config: FastVLConfig
    base_model_prefix = "fastvl"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["VisionBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, EmbQ):
            init.normal_(module.query_tokens, std=self.config.initializer_range)


class FastVLForConditionalGeneration(FastVLPreTrainedModel, GenerationMixin):
    """Images are encoded at prefill (``pixel_values`` given) and their LLM tokens replace the
    ``image_token_id`` placeholders of ``input_ids``, images in order.

    Native tower: ``pixel_values`` [patches, C*t*p*p] with ``image_grid_thw`` [n, 3]; fixed tower:
    ``pixel_values`` [n * crops, C, S, S] (5 crops per image with ``image_hd``). DeepStack groups are
    added to the image tokens entering LLM layers deepstack_start.. (prefill only). With EmbQ each
    run of ``num_query_tokens`` ``query_token_id`` placeholders holds the learned queries; their
    question is the text between the previous image/query token and them (narrowed by
    ``question_mask`` [B, L] when given), and they read it and the images of their sample at the
    input of LLM layer ``embq_layer`` (prefill with images only).
    """

    def __init__(self, config: FastVLConfig):
        super().__init__(config)
        if config.image_token_id is None:
            raise ValueError("config.image_token_id must be set (the id of the image placeholder token)")
        vision, text = config.vision_config, config.text_config
        self.vision_tower = build_vision_tower(vision)
        self.compressor = build_compressor(config)
        self.language_model = AutoModelForCausalLM.from_config(text)
        layers = self.language_model.get_decoder().layers
        deepstack = config.compressor == "deepstack"
        self.vit_taps = config.vit_taps if deepstack and config.deepstack_type == "midlayers" else []
        self.deepstack = DeepStack(layers, config.deepstack_start) if deepstack else None
        self.embq = None
        self._embq_state = None
        if config.use_embq:
            heads = config.embq_heads or text.num_attention_heads
            self.embq = EmbQ(text.hidden_size, vision.embed_dim, config.embq_dim, heads, config.num_query_tokens)
            layers[config.embq_layer].register_forward_pre_hook(self._embq_hook, with_kwargs=True)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    def get_decoder(self):
        return self.language_model.get_decoder()

    @property
    def crops_per_image(self):
        return 5 if self.config.image_hd else 1

    def num_image_tokens(self, images):
        """LLM tokens of each image: ``images`` is ``image_grid_thw`` ([n, 3]) for a native tower; for a
        fixed tower the number of images, or their ``pixel_values`` ([n * crops, C, S, S])."""
        if self.config.vision_config.tower == "native":
            return [self.compressor.tokens_per_grid(*row) for row in torch.as_tensor(images).tolist()]
        if isinstance(images, torch.Tensor):
            if images.shape[0] % self.crops_per_image:
                raise ValueError(f"pixel_values: {images.shape[0]} crops are not {self.crops_per_image} per image")
            images = images.shape[0] // self.crops_per_image
        g = self.config.vision_config.grid_size
        return [self.crops_per_image * self.compressor.tokens_per_grid(1, g, g)] * images

    def encode_images(self, pixel_values, image_grid_thw=None):
        """(LLM tokens [L, D], stacked DeepStack groups [S, L, D] or None, ViT tokens [T, C], ViT tokens per image)."""
        native = self.config.vision_config.tower == "native"
        if native and image_grid_thw is None:
            raise ValueError("image_grid_thw is required with a native-resolution vision tower")
        x, taps, rows = self.vision_tower(pixel_values, image_grid_thw, self.vit_taps)
        main, stacked = self.compressor(x, taps, rows)
        if native:
            return main, stacked, x, [t * h * w for t, h, w in rows]
        crops = self.crops_per_image
        if len(rows) % crops:
            raise ValueError(f"pixel_values: {len(rows)} crops are not {crops} per image (image_hd)")
        return main, stacked, x, [crops * self.config.vision_config.grid_size ** 2] * (len(rows) // crops)

    def forward(
        self, input_ids=None, pixel_values=None, image_grid_thw=None, attention_mask=None, position_ids=None,
        past_key_values=None, inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
        question_mask=None, **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if self.deepstack is not None:
            self.deepstack.disarm()
        self._embq_state = None
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        images = None
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError("pixel_values need input_ids, which mark where the image tokens go")
            inputs_embeds, images = self._place_images(input_ids, inputs_embeds, pixel_values, image_grid_thw)
        if self.embq is not None and input_ids is not None:
            inputs_embeds = self._place_queries(input_ids, inputs_embeds, attention_mask, question_mask, images)
        return self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, labels=labels, use_cache=use_cache, logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def _place_images(self, input_ids, embeds, pixel_values, image_grid_thw):
        """Scatter the image tokens; arm DeepStack; return the embeddings and, per sample, its ViT tokens."""
        main, stacked, vit_tokens, vit_per_image = self.encode_images(pixel_values, image_grid_thw)
        mask = input_ids == self.config.image_token_id
        per_sample = mask.sum(1).tolist()
        if sum(per_sample) != main.shape[0]:
            raise ValueError(
                f"input_ids hold {sum(per_sample)} image tokens but the images give {main.shape[0]} "
                "(expand each image placeholder to num_image_tokens(...) tokens)"
            )
        embeds = embeds.masked_scatter(mask[..., None], main.to(embeds.dtype))
        if stacked is not None:
            # the rows of this batch's own image tokens: valid by construction, no host sync per layer
            self.deepstack.arm(mask.reshape(-1).nonzero().squeeze(1), stacked, check_index=False)
        if self.embq is None:
            return embeds, None
        # which images belong to which sample: consecutive images whose LLM tokens fill its image tokens
        llm_per_image = self.num_image_tokens(pixel_values if image_grid_thw is None else image_grid_thw)
        vit_chunks = iter(vit_tokens.split(vit_per_image))
        counts = iter(llm_per_image)
        images = []
        for b, need in enumerate(per_sample):
            chunks = []
            while need > 0:
                need -= next(counts)
                chunks.append(next(vit_chunks))
            if need:
                raise ValueError(f"input_ids: the image tokens of sample {b} end inside an image")
            images.append(torch.cat(chunks) if chunks else None)
        return embeds, images

    def _place_queries(self, input_ids, embeds, attention_mask, question_mask, images):
        """Add the learned queries at the query placeholders; arm EmbQ when images are present."""
        query_mask = input_ids == self.config.query_token_id
        if not query_mask.any():
            return embeds
        blocks = self._query_blocks(input_ids, attention_mask, question_mask)
        queries = self.embq.query_tokens.to(embeds.dtype).repeat(len(blocks), 1)
        embeds = embeds + torch.zeros_like(embeds).masked_scatter(query_mask[..., None], queries)
        if images is not None:
            length, device = input_ids.shape[1], input_ids.device
            state = [
                (torch.arange(b * length + p, b * length + p + len(self.embq.query_tokens), device=device),
                 torch.tensor([b * length + i for i in text], dtype=torch.long, device=device), images[b])
                for b, p, text in blocks if images[b] is not None
            ]
            self._embq_state = state or None
        return embeds

    def _query_blocks(self, input_ids, attention_mask, question_mask):
        """[(sample, first position, question positions)] of every query block, computed on the host."""
        q, image, n = self.config.query_token_id, self.config.image_token_id, self.config.num_query_tokens
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        for name, m in (("attention_mask", attention_mask), ("question_mask", question_mask)):
            if m is not None:
                if m.shape != input_ids.shape:
                    raise ValueError(f"{name} must have the shape of input_ids {list(input_ids.shape)}, got {list(m.shape)}")
                keep &= m.bool()
        blocks = []
        for b, (ids, ok) in enumerate(zip(input_ids.tolist(), keep.tolist())):
            start, run = 0, 0
            for i, token in enumerate(ids + [None]):
                if token == q:
                    if run % n == 0:
                        blocks.append((b, i, [j for j in range(start, i) if ok[j]]))
                    run += 1
                    start = i + 1
                    continue
                if run % n:
                    raise ValueError(f"input_ids: a run of {run} query tokens in sample {b} is not a multiple of {n}")
                run = 0
                if token == image:
                    start = i + 1
        return blocks

    def _embq_hook(self, module, args, kwargs):
        if self._embq_state is None:
            return None
        return replace_hidden(args, kwargs, self._apply_embq)

    def _apply_embq(self, hidden):
        flat = hidden.reshape(-1, hidden.shape[-1])
        index = torch.cat([queries for queries, _, _ in self._embq_state])
        update = torch.cat([self.embq(flat[queries], flat[text], image) for queries, text, image in self._embq_state])
        return ops.deepstack_add(hidden, index, update.to(hidden.dtype))
