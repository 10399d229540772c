"""Small configs for fast CPU tests (a few thousand to a few hundred thousand parameters)."""

from llmtrain.models import MLAConfig, RetentionConfig

VOCAB = 101
PAD, EOS = 0, 3


def small_retention(**overrides) -> RetentionConfig:
    values = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=32,
                  intermediate_size=96, pad_token_id=PAD, eos_token_id=EOS)
    return RetentionConfig(**{**values, **overrides})


def small_mla(**overrides) -> MLAConfig:
    values = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, q_lora_rank=32,
                  kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, intermediate_size=96,
                  max_position_embeddings=256, rope_theta=10000.0, pad_token_id=PAD, eos_token_id=EOS)
    return MLAConfig(**{**values, **overrides})
