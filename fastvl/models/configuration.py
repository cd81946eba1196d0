"""FastVL configuration: a vision tower, a compressor (+ projector), optional EmbQ, any HF causal LM."""
from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

TOWERS = ("native", "fixed")
COMPRESSORS = {"native": ("none", "patch_merge", "sap", "deepstack"), "fixed": ("none", "sap")}
DEEPSTACK_TYPES = ("midlayers", "efficient")
DEEPSTACK_ORDERS = ("spatial", "slimm")
TEMPLATES = ("qwen2", "phi2", "plain")


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


class FastVLVisionConfig(PretrainedConfig):
    """A ViT: ``tower='native'`` is Qwen2-VL's dynamic-resolution tower (packed pixel rows of
    in_channels*temporal_patch_size*patch_size**2 values, 2D RoPE, optional Qwen2.5-VL windows);
    ``tower='fixed'`` is a SigLIP-style tower (square images of ``image_size``, learned positions).
    The defaults are Qwen2-VL's ViT; ``siglip_so400m()`` gives FlashSloth's tower.
    """

    model_type = "fastvl_vision"
    base_config_key = "vision_config"

    tower: str = "native"
    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    intermediate_size: int = 5120
    hidden_act: str = "quick_gelu"
    mlp_type: str = "fc"  # fc1-act-fc2; "swiglu": Qwen2.5-VL's gate/up/down
    norm: str = "layernorm"  # "rmsnorm": Qwen2.5-VL
    norm_eps: float = 1e-6
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    rope_theta: float = 10000.0
    window_size: int = 0  # pixels per attention window side (Qwen2.5-VL: 112); 0 = full attention everywhere
    fullatt_block_indexes: list[int] | None = None
    image_size: int = 384
    input_patch_size: int | None = None  # native: pixel rows of one merge window each (SliMM DeepStack-Efficient: 28)
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _choice("vision_config.tower", self.tower, TOWERS)
        _choice("vision_config.mlp_type", self.mlp_type, ("fc", "swiglu"))
        _choice("vision_config.norm", self.norm, ("layernorm", "rmsnorm"))
        for name in ("depth", "embed_dim", "num_heads", "intermediate_size", "patch_size", "spatial_merge_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"vision_config.{name} must be a positive int, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"vision_config: embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}"
            )
        if self.tower == "native" and self.head_dim % 4:
            raise ValueError(f"vision_config: head_dim {self.head_dim} (embed_dim / num_heads) must be a multiple "
                             "of 4 for the 2D RoPE of the native tower")
        if self.window_size and self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ValueError(
                f"vision_config: window_size={self.window_size} must be a multiple of patch_size*spatial_merge_size "
                f"({self.patch_size * self.spatial_merge_size})"
            )
        window = self.patch_size * self.spatial_merge_size
        if self.input_patch_size is not None and (self.tower != "native" or self.input_patch_size != window):
            raise ValueError(f"vision_config: input_patch_size must be None or patch_size*spatial_merge_size "
                             f"({window}) with the native tower, got {self.input_patch_size}")

    @property
    def input_unit(self):
        """Patches per side of one ``image_grid_thw`` cell (``input_patch_size / patch_size``, else 1)."""
        return self.input_patch_size // self.patch_size if self.input_patch_size else 1

    @property
    def head_dim(self):
        return self.embed_dim // self.num_heads

    @property
    def grid_size(self):
        """Patches per side of a fixed-resolution image (the last partial patch is dropped, as in SigLIP)."""
        return self.image_size // self.patch_size

    @classmethod
    def siglip_so400m(cls, **overrides):
        """SigLIP-so400m-patch14-384 as FlashSloth uses it: 26 of its 27 layers, no post-norm."""
        defaults = dict(
            tower="fixed", depth=26, embed_dim=1152, num_heads=16, intermediate_size=4304,
            hidden_act="gelu_pytorch_tanh", image_size=384, patch_size=14,
        )
        return cls(**{**defaults, **overrides})


class FastVLConfig(PretrainedConfig):
    """FastVL = vision tower -> compressor (with its projector) -> HF causal LM (``text_config``).

    compressor:
      'none'         every ViT token, through an mlp2x_gelu projector;
      'patch_merge'  Qwen2-VL's PatchMerger (2x2 -> 1), which is also the projector;
      'sap'          FlashSloth's spatial attention pooling (``sap_window``, 3: 729 -> 81), then mlp2x_gelu;
      'deepstack'    SliMM's DeepStack: ``deepstack_type='midlayers'`` adds merged taps of ViT blocks
                     ``deepstack_vit_layers`` (default 8/16/24/30 scaled to the depth) to the image tokens
                     before LLM layers ``deepstack_start``.. ; ``'efficient'`` gives the LLM one token per
                     4x4 patches and adds the four 2x2-merged groups (``deepstack_order``) instead.
    use_embq: FlashSloth's embedded queries: ``num_query_tokens`` learned tokens replace each run of
    ``query_token_id`` placeholders and, at the input of LLM layer ``embq_layer`` (prefill only),
    cross-attend to their question, then to the un-compressed image tokens.

    Positions: ``mrope_section`` (t, h, w) switches the LLM to Qwen2-VL's M-RoPE: its rotary frequencies are split
    into these three sections, text runs on one index on all three axes, each image's (video's) LLM tokens take
    (frame, row, column) of their grid offset by that index, and the text after it continues after the largest
    position (``tokens_per_second``: Qwen2.5-VL spaces video frames by tokens_per_second * second_per_grid_ts).
    None (the default): 1D positions.

    Original models' rules, set by ``fastvl convert`` (the defaults are fastvl's):
      embq_question_start  None: a query block's question is the text since the previous image or query block.
                           k (FlashSloth: 32): every block of a sample reads the tokens from k + the LLM tokens of
                           the sample's first image + 1 (the newline) up to the sample's first block.
      embq_without_image   'queries': samples without images get their queries too (EmbQ does not run).
                           'plain' (FlashSloth): their query tokens stay ordinary tokens.
      embq_image           'sample': EmbQ reads every image of its own sample. 'batch_index' (FlashSloth): sample
                           b reads the b-th image of the batch.
      deepstack_vit_layers SliMM taps ViT blocks 8/16/24/30 whatever the depth.
      vision_config.input_patch_size  SliMM DeepStack-Efficient takes 28-px pixel rows and grids.
    """

    model_type = "fastvl"
    sub_configs_defaults = {
        "vision_config": FastVLVisionConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    vision_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    compressor: str = "patch_merge"
    deepstack_type: str = "midlayers"
    deepstack_vit_layers: list[int] | None = None
    deepstack_start: int = 1
    deepstack_order: str = "spatial"
    sap_window: int = 3
    sap_dropout: float = 0.1
    image_hd: bool = False  # fixed tower: each image is 5 crops (global + 2x2), FlashSloth-HD
    image_token_id: int | None = None
    use_embq: bool = False
    query_token_id: int | None = None
    num_query_tokens: int = 9
    embq_layer: int = 7
    embq_dim: int = 576
    embq_heads: int | None = None  # default: the LLM's attention heads
    embq_question_start: int | None = None
    embq_without_image: str = "queries"
    embq_image: str = "sample"
    video_token_id: int | None = None
    mrope_section: list[int] | None = None
    tokens_per_second: float | None = None
    chat_template: str = "qwen2"
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        tower = self.vision_config.tower
        _choice(f"compressor (with a {tower} tower)", self.compressor, COMPRESSORS[tower])
        _choice("deepstack_type", self.deepstack_type, DEEPSTACK_TYPES)
        _choice("deepstack_order", self.deepstack_order, DEEPSTACK_ORDERS)
        _choice("chat_template", self.chat_template, TEMPLATES)
        _choice("embq_without_image", self.embq_without_image, ("queries", "plain"))
        _choice("embq_image", self.embq_image, ("sample", "batch_index"))
        if self.embq_question_start is not None and (not isinstance(self.embq_question_start, int)
                                                     or self.embq_question_start < 0):
            raise ValueError(
                f"embq_question_start must be None or a non-negative int, got {self.embq_question_start!r}"
            )
        if self.mrope_section is not None:
            section = self.mrope_section
            if (not isinstance(section, (list, tuple)) or len(section) != 3
                    or not all(isinstance(n, int) and n > 0 for n in section)):
                raise ValueError(f"mrope_section must be three positive ints (t, h, w), got {section!r}")
            if tower != "native":
                raise ValueError("mrope_section needs the native vision tower (image grids give the positions)")
        if self.tokens_per_second is not None and self.mrope_section is None:
            raise ValueError("tokens_per_second spaces M-RoPE video frames: it needs mrope_section")
        layers = self.text_config.num_hidden_layers
        if self.compressor == "deepstack":
            groups = 4 if self.deepstack_type == "efficient" else len(self.vit_taps)
            if not 0 <= self.deepstack_start or self.deepstack_start + groups > layers:
                raise ValueError(
                    f"deepstack_start={self.deepstack_start}: {groups} stacked groups need LLM layers "
                    f"{self.deepstack_start}..{self.deepstack_start + groups - 1}, the LLM has {layers}"
                )
            bad = [i for i in self.vit_taps if not 0 < i < self.vision_config.depth]
            if bad:
                raise ValueError(f"deepstack_vit_layers {bad} must lie in [1, {self.vision_config.depth})")
        if self.use_embq:
            if self.query_token_id is None:
                raise ValueError("use_embq needs query_token_id (the id of the query placeholder token)")
            if not 0 <= self.embq_layer < layers:
                raise ValueError(f"embq_layer={self.embq_layer} must lie in [0, {layers})")
            heads = self.embq_heads or self.text_config.num_attention_heads
            for name, dim in (("embq_dim", self.embq_dim), ("vision embed_dim", self.vision_config.embed_dim)):
                if dim % heads:
                    raise ValueError(f"{name}={dim} is not divisible by the {heads} EmbQ heads (embq_heads)")

    @property
    def vit_taps(self):
        """ViT blocks whose input feeds DeepStack-MidLayers (SliMM: 8/16/24/30 of 32)."""
        if self.deepstack_vit_layers is not None:
            return list(self.deepstack_vit_layers)
        depth = self.vision_config.depth
        return [max(1, min(depth - 1, round(i * depth / 32))) for i in (8, 16, 24, 30)]
