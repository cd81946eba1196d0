"""FastVLForConditionalGeneration: vision tower -> compressor -> any Hugging Face causal LM."""
import os

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init

from .. import ops
from ..data.conversation import IGNORE_INDEX
from ..nn import DeepStack
from ..nn.modules import replace_hidden
from .compressor import build_compressor
from .configuration import FastVLConfig
from .embq import EmbQ
from .packing import find_samples, sample_positions
from .rope import MultimodalRotary, mrope_positions
from .vision import build_vision_tower


class FastVLPreTrainedModel(PreTrainedModel):
    config: FastVLConfig
    base_model_prefix = "fastvl"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["VisionBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
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
    ``image_token_id`` placeholders of ``input_ids``, images in order; videos (native tower,
    ``pixel_values_videos`` + ``video_grid_thw``) replace the ``video_token_id`` placeholders. A batch
    without images (no rows in ``pixel_values``) runs as text. Image token ids are never looked up in
    the embedding table (an id outside the vocabulary, such as FlashSloth's -200, works).

    Native tower: ``pixel_values`` [patches, C*t*p*p] with ``image_grid_thw`` [n, 3]; fixed tower:
    ``pixel_values`` [n * crops, C, S, S] (5 crops per image with ``image_hd``). DeepStack groups are
    added to the image tokens entering LLM layers deepstack_start.. (prefill only). With EmbQ each
    run of ``num_query_tokens`` ``query_token_id`` placeholders holds the learned queries; their
    question is the text between the previous image/query token and them (narrowed by
    ``question_mask`` [B, L] when given; ``embq_question_start`` changes the rule), and they read it
    and the images of their sample at the input of LLM layer ``embq_layer`` (prefill with images only).
    With ``mrope_section`` the LLM's positions are Qwen2-VL's M-RoPE, computed from ``input_ids`` and
    the grids at prefill; decoding continues from them (``position_ids`` [3 or 4, B, L] are used as given).

    ``from_pretrained`` also takes a Qwen2-VL / Qwen2.5-VL, SliMM or FlashSloth checkpoint directory
    and converts it (``fastvl.models.convert``).
    """

    def __init__(self, config: FastVLConfig):
        super().__init__(config)
        if config.image_token_id is None:
            raise ValueError("config.image_token_id must be set (the id of the image placeholder token)")
        vision, text = config.vision_config, config.text_config
        self.vision_tower = build_vision_tower(vision)
        self.compressor = build_compressor(config)
        self.language_model = AutoModelForCausalLM.from_config(text)
        decoder = self.language_model.get_decoder()
        layers = decoder.layers
        deepstack = config.compressor == "deepstack"
        self.vit_taps = config.vit_taps if deepstack and config.deepstack_type == "midlayers" else []
        self.deepstack = DeepStack(layers, config.deepstack_start) if deepstack else None
        self.embq = None
        self._embq_state = None
        if config.use_embq:
            heads = config.embq_heads or text.num_attention_heads
            self.embq = EmbQ(text.hidden_size, vision.embed_dim, config.embq_dim, heads, config.num_query_tokens)
            layers[config.embq_layer].register_forward_pre_hook(self._embq_hook, with_kwargs=True)
        self._rope_deltas = None
        if config.mrope_section is not None:
            if not isinstance(getattr(decoder, "rotary_emb", None), torch.nn.Module):
                raise ValueError(f"mrope_section: the {type(decoder).__name__} language model has no rotary_emb")
            decoder.rotary_emb = MultimodalRotary(decoder.rotary_emb, config.mrope_section)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        from .convert import checkpoint_format, convert

        path = pretrained_model_name_or_path
        source = checkpoint_format(path) if os.path.isdir(path) else "fastvl"
        if source == "fastvl":
            return super().from_pretrained(path, *args, **kwargs)
        dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
        if args or kwargs:
            raise TypeError(f"from_pretrained of a {source} checkpoint takes only dtype, got {[*args, *kwargs]}")
        return convert(path, source, dtype=None if dtype == "auto" else dtype)

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

    def vit_grids(self, image_grid_thw):
        """The ViT patch grid (t, h, w) of each ``image_grid_thw`` row (which is in input patches)."""
        unit = self.config.vision_config.input_unit
        return [[t, h * unit, w * unit] for t, h, w in torch.as_tensor(image_grid_thw).tolist()]

    def num_image_tokens(self, images):
        """LLM tokens of each image: ``images`` is ``image_grid_thw`` ([n, 3]) for a native tower; for a
        fixed tower the number of images, or their ``pixel_values`` ([n * crops, C, S, S])."""
        if self.config.vision_config.tower == "native":
            return [self.compressor.tokens_per_grid(*row) for row in self.vit_grids(images)]
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
        inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, question_mask=None,
        pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, **kwargs,
    ):
        """Other keyword arguments (the KV cache among them) go to the language model.

        A packed batch (``DataCollatorWithFlattening``'s layout: batch size 1, ``position_ids`` restarting at 0 for
        each sample and/or its ``cu_seq_lens_q``/``cu_seq_lens_k``/``max_length_q``/``max_length_k``; the images of
        all samples in order) computes what the padded batch of the same samples computes: attention, M-RoPE
        positions and EmbQ stay within each sample, and the first label of each sample is never a target. Its
        language model must run the ``"fastvl"`` attention (ValueError otherwise). ``logits_to_keep="supervised"``
        (with ``labels``): logits only where the next label is a target, flattened to [targets, vocab], and the loss
        from them.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if self.deepstack is not None:
            self.deepstack.disarm()
        self._embq_state = None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = 0 if cache is None else cache.get_seq_length()
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        samples = find_samples(batch, length, attention_mask, position_ids, kwargs.pop("cu_seq_lens_q", None),
                               kwargs.pop("cu_seq_lens_k", None), past)
        for name in ("max_length_q", "max_length_k"):
            kwargs.pop(name, None)
        if samples.packed:
            self._check_packed_attention(len(samples.spans))
        visuals = self._visual_inputs(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        if visuals and input_ids is None:
            raise ValueError("pixel_values need input_ids, which mark where the image tokens go")
        if inputs_embeds is None:
            text = input_ids
            for _, token, *_ in visuals:
                text = text.masked_fill(input_ids == token, 0)
            inputs_embeds = self.get_input_embeddings()(text)
        images = None
        if visuals:
            inputs_embeds, images = self._place_visuals(input_ids, inputs_embeds, visuals, samples)
        if self.embq is not None and input_ids is not None:
            inputs_embeds = self._place_queries(input_ids, inputs_embeds, attention_mask, question_mask, images,
                                                samples)
        rotary = self.get_decoder().rotary_emb if self.config.mrope_section is not None else None
        if rotary is not None:
            position_ids, rotary.positions = self._mrope(
                input_ids, attention_mask, position_ids, visuals, second_per_grid_ts, inputs_embeds, past, samples)
        if samples.packed:
            if position_ids is None or position_ids.dim() == 3:
                position_ids = sample_positions(samples, inputs_embeds.device)
            cu = samples.cu.to(inputs_embeds.device)
            kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=samples.longest,
                          max_length_k=samples.longest)
            if labels is not None:  # the last token of a sample predicts nothing of the next one
                starts = torch.tensor([lo for _, lo, _ in samples.spans], device=labels.device)
                labels = labels.index_fill(1, starts, IGNORE_INDEX)
        keep_supervised = isinstance(logits_to_keep, str)
        if keep_supervised:
            if logits_to_keep != "supervised" or labels is None:
                raise ValueError(f"logits_to_keep: an int, a tensor, or 'supervised' (with labels), got "
                                 f"{logits_to_keep!r}{'' if labels is not None else ' without labels'}")
            targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
            logits_to_keep = targets != IGNORE_INDEX
        try:
            out = self.language_model(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                labels=None if keep_supervised else labels, use_cache=use_cache, logits_to_keep=logits_to_keep,
                **kwargs,
            )
        finally:
            if rotary is not None:
                rotary.positions = None
        if keep_supervised:
            out["loss"] = self.language_model.loss_function(
                logits=out.logits, labels=None, vocab_size=out.logits.shape[-1], shift_labels=targets[logits_to_keep],
                **kwargs)
        return out

    def _check_packed_attention(self, num_samples):
        from ..integrations.attention import NAME

        used = self.language_model.config._attn_implementation
        if num_samples > 1 and used != NAME:
            raise ValueError(
                f'attn_implementation: a packed batch needs the language model on "{NAME}" attention, which attends '
                f'within each sample; it runs "{used}". Switch it with fastvl.integrations.register_attention(); '
                f'model.set_attn_implementation({{"text_config": "{NAME}"}})')

    def _visual_inputs(self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
        """[(kind, token id, pixel values, grid)] of the images and videos given with at least one row."""
        config = self.config
        visuals = []
        for name, token, pixels, grid in (("image", config.image_token_id, pixel_values, image_grid_thw),
                                          ("video", config.video_token_id, pixel_values_videos, video_grid_thw)):
            if pixels is None or (pixels.shape[0] == 0 and (grid is None or torch.as_tensor(grid).numel() == 0)):
                continue
            if name == "video" and (token is None or config.vision_config.tower != "native" or self.embq is not None):
                raise ValueError("pixel_values_videos need a native vision tower, config.video_token_id and no EmbQ")
            visuals.append((name, token, pixels, grid))
        return visuals

    def _place_visuals(self, input_ids, embeds, visuals, samples):
        """Scatter the image and video tokens and arm DeepStack. With EmbQ, returns per sample (its ViT
        image tokens, the LLM tokens of its first image), both None for a sample without images."""
        index, groups, images = [], [], None
        for kind, token, pixels, grid in visuals:
            main, stacked, vit_tokens, vit_per_image = self.encode_images(pixels, grid)
            mask = input_ids == token
            found = int(mask.sum())
            if found != main.shape[0]:
                raise ValueError(
                    f"input_ids hold {found} {kind} tokens (id {token}) but the {kind}s give "
                    f"{main.shape[0]} (expand each placeholder to num_image_tokens(...) tokens)"
                )
            embeds = embeds.masked_scatter(mask[..., None], main.to(embeds.dtype))
            if stacked is not None:
                index.append(mask.reshape(-1).nonzero().squeeze(1))
                groups.append(stacked)
            if self.embq is not None:
                counts = F.pad(mask.reshape(-1).cumsum(0), (1, 0)).tolist()
                length = input_ids.shape[1]
                per_sample = [counts[row * length + hi] - counts[row * length + lo] for row, lo, hi in samples.spans]
                images = self._images_per_sample(per_sample, self.num_image_tokens(grid if grid is not None
                                                                                   else pixels),
                                                 vit_tokens.split(vit_per_image))
        if groups:
            # the rows of this batch's own image tokens: valid by construction, no host sync per layer
            self.deepstack.arm(torch.cat(index), torch.cat(groups, 1), check_index=False)
        return embeds, images

    def _images_per_sample(self, per_sample, llm_per_image, vit_per_image):
        """Consecutive images fill each sample's image tokens; EmbQ reads them (``embq_image``)."""
        counts = iter(enumerate(llm_per_image))
        samples = []
        for b, need in enumerate(per_sample):
            owned = []
            while need > 0:
                i, n = next(counts)
                need -= n
                owned.append(i)
            if need:
                raise ValueError(f"input_ids: the image tokens of sample {b} end inside an image")
            if not owned:
                samples.append((None, None))
            elif self.config.embq_image == "batch_index":  # FlashSloth reads image b for sample b
                if b >= len(vit_per_image):
                    raise ValueError(f"embq_image='batch_index': sample {b} has images but the batch has only "
                                     f"{len(vit_per_image)}")
                samples.append((vit_per_image[b], llm_per_image[owned[0]]))
            else:
                samples.append((torch.cat([vit_per_image[i] for i in owned]), llm_per_image[owned[0]]))
        return samples

    def _place_queries(self, input_ids, embeds, attention_mask, question_mask, images, samples):
        """Add the learned queries at the query placeholders; arm EmbQ for samples with images."""
        first_image = None if images is None else [first for _, first in images]
        blocks = self._query_blocks(input_ids, attention_mask, question_mask, first_image, samples.spans)
        if not blocks:
            return embeds
        n = self.config.num_query_tokens
        rows = [torch.arange(p, p + n, device=input_ids.device) for _, p, _ in blocks]
        queries = self.embq.query_tokens.to(embeds.dtype).repeat(len(blocks), 1)
        embeds = ops.deepstack_add(embeds, torch.cat(rows), queries)
        if images is not None:
            state = [(block_rows, torch.tensor(text, dtype=torch.long, device=input_ids.device), images[s][0])
                     for block_rows, (s, _, text) in zip(rows, blocks) if images[s][0] is not None]
            self._embq_state = state or None
        return embeds

    def _query_blocks(self, input_ids, attention_mask=None, question_mask=None, first_image=None, spans=None):
        """[(sample, first position, question positions)] of every query block, computed on the host; positions
        index the flattened [B*L] tokens.

        ``first_image``: per sample, the LLM tokens of its first image (None: no image; all None when not given);
        ``spans``: (row, start, end) of each sample (default: one per row).
        """
        config = self.config
        q, image, n = config.query_token_id, config.image_token_id, config.num_query_tokens
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        for name, m in (("attention_mask", attention_mask), ("question_mask", question_mask)):
            if m is not None:
                if m.shape != input_ids.shape:
                    raise ValueError(f"{name} must have the shape of input_ids {list(input_ids.shape)}, got {list(m.shape)}")
                keep &= m.bool()
        real = torch.ones_like(keep) if attention_mask is None else attention_mask.bool()
        length = input_ids.shape[1]
        spans = spans or [(b, 0, length) for b in range(input_ids.shape[0])]
        first_image = first_image or [None] * len(spans)
        all_ids, all_keep, all_real = input_ids.tolist(), keep.tolist(), real.tolist()
        blocks = []
        for s, (row, lo, hi) in enumerate(spans):
            if config.embq_without_image == "plain" and first_image[s] is None:
                continue  # FlashSloth without an image: plain LLM, query tokens are ordinary tokens
            ids, ok, base = all_ids[row][lo:hi], all_keep[row][lo:hi], row * length + lo
            own, start, run = [], 0, 0
            for i, token in enumerate(ids + [None]):
                if token == q:
                    if run % n == 0:
                        own.append((s, base + i, [base + j for j in range(start, i) if ok[j]]))
                    run += 1
                    start = i + 1
                    continue
                if run % n:
                    raise ValueError(f"input_ids: a run of {run} query tokens in sample {s} is not a multiple of {n}")
                run = 0
                if token == image:
                    start = i + 1
            if own and config.embq_question_start is not None:
                # FlashSloth: counted in the unpadded sample from a fixed prompt length, past the first image and
                # the newline after it, up to the first block; every block reads that span
                unpadded = [i for i, r in enumerate(all_real[row][lo:hi]) if r]
                first = config.embq_question_start + (0 if first_image[s] is None else first_image[s] + 1)
                text = [base + i for i in unpadded[first:unpadded.index(own[0][1] - base)] if ok[i]]
                own = [(s, p, text) for s, p, _ in own]
            blocks += own
        return blocks

    def _mrope(self, input_ids, attention_mask, position_ids, visuals, second_per_grid_ts, embeds, past, samples):
        """(position_ids for the LLM, M-RoPE positions [3, B, L]); prefill computes them from the ids and stores
        the decoding offsets, later steps add those to the text positions. Each sample of a packed batch gets
        its positions as if it were alone."""
        if position_ids is not None and position_ids.dim() == 3:  # [3, B, L] or [text; 3 axes]
            return (position_ids[0] if position_ids.shape[0] == 4 else None), position_ids[-3:]
        batch, length = embeds.shape[:2]
        if input_ids is not None and past == 0:
            grids = {}
            for kind, token, pixels, grid in visuals:
                llm = [self.compressor.llm_grid(*row) for row in self.vit_grids(grid)]
                if kind == "video" and self.config.tokens_per_second is not None:
                    seconds = [1.0] * len(llm) if second_per_grid_ts is None else torch.as_tensor(
                        second_per_grid_ts).tolist()
                    steps = [self.config.tokens_per_second * s for s in seconds]
                else:
                    steps = [1] * len(llm)
                grids[token] = [(*row, step) for row, step in zip(llm, steps)]
            if not samples.packed:
                rope, self._rope_deltas = mrope_positions(input_ids, attention_mask, grids)
                return position_ids, rope
            # one padded row per sample, then back to the packed row
            ids = torch.nn.utils.rnn.pad_sequence([input_ids[row, lo:hi] for row, lo, hi in samples.spans], True)
            real = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
            for i, (_, lo, hi) in enumerate(samples.spans):
                real[i, :hi - lo] = True
            rope, _ = mrope_positions(ids, real, grids)
            self._rope_deltas = None
            return position_ids, rope[:, real].view(3, 1, length)
        if position_ids is not None:
            text = position_ids
        elif attention_mask is not None:
            text = attention_mask.long().cumsum(-1)[:, -length:] - 1
        else:
            text = torch.arange(past, past + length, device=embeds.device).expand(batch, -1)
        deltas = self._rope_deltas
        if past and deltas is not None and deltas.shape[0] == text.shape[0]:
            text = text + deltas.to(text.device)
        return position_ids, text[None].expand(3, -1, -1)

    def _embq_hook(self, module, args, kwargs):
        if self._embq_state is None:
            return None
        return replace_hidden(args, kwargs, self._apply_embq)

    def _apply_embq(self, hidden):
        flat = hidden.reshape(-1, hidden.shape[-1])
        index = torch.cat([queries for queries, _, _ in self._embq_state])
        update = torch.cat([self.embq(flat[queries], flat[text], image) for queries, text, image in self._embq_state])
        return ops.deepstack_add(hidden, index, update.to(hidden.dtype))
