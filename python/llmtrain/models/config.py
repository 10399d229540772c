"""Model configurations and the named size presets.

Both configs are Hugging Face ``PretrainedConfig`` subclasses with their own ``model_type``, so
``save_pretrained`` writes them to config.json and ``AutoConfig`` reads them back once
``llmtrain.models`` has been imported (which registers them). Every value is checked when a config
is built, so a bad preset override fails at construction with a message naming the field.
"""

from __future__ import annotations

from typing import Any, Optional

from transformers import PretrainedConfig

# Kernels implement these head dims (llmtrain.ops.power_retention).
RETENTION_HEAD_DIMS = (32, 64, 128)


def _check_positive_int(config_name: str, **values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{config_name}: {name} must be a positive int, got {value!r}")


def _check_positive_float(config_name: str, **values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{config_name}: {name} must be a positive number, got {value!r}")


class RetentionConfig(PretrainedConfig):
    """A pre-norm decoder whose token mixer is gated power retention (degree 2).

    Attention heads have ``head_dim`` channels; ``num_key_value_heads`` < ``num_attention_heads``
    gives grouped queries (GQA). Each KV head has one forget gate, log_g = logsigmoid(gate).
    ``qk_norm`` is "rms" (RMSNorm over each head's q and k, with a learned scale), "l2" (unit
    vectors times sqrt(head_dim)) or "none".
    """

    model_type = "llmtrain_retention"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]  # (the output cache field before / from transformers 5.24)

    def __init__(
        self,
        vocab_size: int = 50304,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: Optional[int] = None,
        head_dim: int = 64,
        intermediate_size: int = 2048,
        qk_norm: str = "rms",
        gate_half_life_range: tuple[float, float] = (16.0, 4096.0),
        chunk_size: Optional[int] = None,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 65536,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        pad_token_id: Optional[int] = None,
        bos_token_id: Optional[int] = None,
        eos_token_id: Optional[int] = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.qk_norm = qk_norm
        if not isinstance(gate_half_life_range, (tuple, list)):
            raise ValueError(f"RetentionConfig: gate_half_life_range must be a (low, high) pair, got {gate_half_life_range!r}")
        self.gate_half_life_range = tuple(gate_half_life_range)
        self.chunk_size = chunk_size
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        # Retention has no positional limit; this is only the length generation utilities assume.
        self.max_position_embeddings = max_position_embeddings
        self.tie_word_embeddings = tie_word_embeddings
        self.use_cache = use_cache
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self._validate()
        super().__init__(**kwargs)

    def _validate(self) -> None:
        name = "RetentionConfig"
        _check_positive_int(name, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                            num_key_value_heads=self.num_key_value_heads, intermediate_size=self.intermediate_size,
                            max_position_embeddings=self.max_position_embeddings)
        _check_positive_float(name, rms_norm_eps=self.rms_norm_eps, initializer_range=self.initializer_range)
        if self.head_dim not in RETENTION_HEAD_DIMS:
            raise ValueError(f"{name}: head_dim must be one of {RETENTION_HEAD_DIMS} (the retention kernels' "
                             f"head sizes), got {self.head_dim!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(f"{name}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.qk_norm not in ("rms", "l2", "none"):
            raise ValueError(f"{name}: qk_norm must be 'rms', 'l2' or 'none', got {self.qk_norm!r}")
        rng = self.gate_half_life_range
        if (len(rng) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in rng)
                or not 0 < rng[0] <= rng[1]):
            raise ValueError(f"{name}: gate_half_life_range must be (low, high) token counts with "
                             f"0 < low <= high, got {rng!r}")
        if self.chunk_size is not None:
            _check_positive_int(name, chunk_size=self.chunk_size)


class MLAConfig(PretrainedConfig):
    """A pre-norm decoder with DeepSeek-V2 Multi-head Latent Attention and a SwiGLU MLP.

    Queries: hidden -> q_lora_rank (RMSNorm) -> heads x (qk_nope_head_dim + qk_rope_head_dim).
    Keys/values: hidden -> kv_lora_rank latent (RMSNorm) -> heads x (qk_nope_head_dim + v_head_dim),
    plus one rotary key of qk_rope_head_dim shared by all heads. Decoding caches only the latent
    and the rotary key: (kv_lora_rank + qk_rope_head_dim) numbers per token per layer.
    """

    model_type = "llmtrain_mla"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]  # (the output cache field before / from transformers 5.24)

    def __init__(
        self,
        vocab_size: int = 50304,
        hidden_size: int = 2048,
        num_hidden_layers: int = 20,
        num_attention_heads: int = 16,
        q_lora_rank: int = 768,
        kv_lora_rank: int = 512,
        qk_nope_head_dim: int = 128,
        qk_rope_head_dim: int = 64,
        v_head_dim: int = 128,
        intermediate_size: int = 5632,
        max_position_embeddings: int = 16384,
        rope_theta: float = 500000.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        pad_token_id: Optional[int] = None,
        bos_token_id: Optional[int] = None,
        eos_token_id: Optional[int] = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.tie_word_embeddings = tie_word_embeddings
        self.use_cache = use_cache
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self._validate()
        super().__init__(**kwargs)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def _validate(self) -> None:
        name = "MLAConfig"
        _check_positive_int(name, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                            q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank,
                            qk_nope_head_dim=self.qk_nope_head_dim, v_head_dim=self.v_head_dim,
                            intermediate_size=self.intermediate_size,
                            max_position_embeddings=self.max_position_embeddings)
        _check_positive_float(name, rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps,
                              initializer_range=self.initializer_range)
        if isinstance(self.qk_rope_head_dim, bool) or not isinstance(self.qk_rope_head_dim, int) \
                or self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
            raise ValueError(f"{name}: qk_rope_head_dim must be a positive even int (rotary pairs), "
                             f"got {self.qk_rope_head_dim!r}")


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

# Retention sizes follow GPT-2's widths and depths (tiny is a 256-wide, 12-layer model), heads of 64
# channels (width / 64 heads), and a SwiGLU MLP of ~8/3 x width so that a block has ~12 x width^2
# weights like a GPT-2 block. Embeddings are tied except at 7B. Parameter counts with the 50304-token vocab are in
# docs/models.md and asserted by tests/models/test_models_config.py.
RETENTION_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=256, num_hidden_layers=12, num_attention_heads=4, intermediate_size=704),
    "small": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048),
    "medium": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=2752),
    "large": dict(hidden_size=1280, num_hidden_layers=36, num_attention_heads=20, intermediate_size=3456),
    # 7B: Mistral-7B's shape (64 query heads of 64, 8 KV heads, SwiGLU 14336, untied). GQA shrinks the
    # decoding state 8x: 32 layers x 8 heads x (D x 64 + D) floats, ~136 MB per sequence instead of ~1.1 GB.
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=64, num_key_value_heads=8,
               intermediate_size=14336, tie_word_embeddings=False),
}

# The 1B MLA model: DeepSeek-V2-Lite's head geometry (128 nope + 64 rope, v 128, latent 512) at
# width 2048, 20 layers, 16K context, tied embeddings (as Llama-3.2-1B). See docs/models.md for RoPE.
MLA_PRESETS: dict[str, dict[str, Any]] = {
    "1b": dict(hidden_size=2048, num_hidden_layers=20, num_attention_heads=16, q_lora_rank=768,
               kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
               intermediate_size=5632, max_position_embeddings=16384, rope_theta=500000.0,
               tie_word_embeddings=True),
}

# Parameter counts the presets are meant to have (the figures); tests hold them to +-10%.
TARGET_PARAMS = {"tiny": 23e6, "small": 125e6, "medium": 355e6, "large": 774e6, "7b": 7e9, "mla-1b": 1e9}


def preset_names() -> list[str]:
    return list(RETENTION_PRESETS) + [f"mla-{name}" for name in MLA_PRESETS]


def create_model_config(name: str, **overrides: Any) -> PretrainedConfig:
    """The config of a named preset, with any field overridden (e.g. ``vocab_size=len(tokenizer)``).

    Retention presets: tiny, small, medium, large, 7b. MLA presets: mla-1b (also "1b").
    """
    if not isinstance(name, str):
        raise TypeError(f"create_model_config: name must be a string, got {type(name).__name__}")
    key = name.lower()
    if key in RETENTION_PRESETS:
        return RetentionConfig(**{**RETENTION_PRESETS[key], **overrides})
    mla_key = key[len("mla-"):] if key.startswith("mla-") else key
    if mla_key in MLA_PRESETS:
        return MLAConfig(**{**MLA_PRESETS[mla_key], **overrides})
    raise ValueError(f"create_model_config: unknown preset {name!r}; known: {', '.join(preset_names())}")
