"""Model FLOPs per trained token: the numerator of MFU.

    flops/token = 6 * N_matmul + mixer(T)

- N_matmul: parameters that take part in a matmul per token, i.e. all parameters minus lookup-only
  tables (an untied input embedding, GPT-2's position embedding). A tied embedding counts once: it
  is the lm_head's matmul. 6 = 2 (multiply-add) x 3 (forward, and backward's two GEMMs).
- mixer(T), the token mixer's work that no parameter count sees, forward + backward = 3 x forward:
  - softmax attention (MHA, MLA, the baselines): 6 * L * T * heads * (d_qk + d_v) — QK^T and AV over
    all T keys; causal masking is not halved (the PaLM / nanoGPT convention; for MHA it is 12*L*H*T).
  - power retention (degree 2, chunk C, D = d(d+1)/2 features): per layer and token,
    3 * [(heads_q + heads_kv) * 2*D*(d+1) + heads_q * 2*C*(2d+1)] — the state query and update
    (the canonical count of docs/perf.md) plus the intra-chunk quadratic part; it does not grow with T.
Activation recomputation (activation checkpointing) is not counted: MFU counts model FLOPs.
"""

from __future__ import annotations

FORMULA = ("6*N_matmul + mixer; attention mixer = 6*L*T*heads*(d_qk+d_v) (causal not halved); "
           "retention mixer = 3*L*[(h_q+h_kv)*2*D*(d+1) + h_q*2*C*(2d+1)], D=d(d+1)/2, C=chunk")


# Peak dense 16-bit tensor FLOP/s (no sparsity) by device name: the MFU denominator for the training log
# and `llmtrain bench train` alike. SXM parts; an unlisted GPU gets no MFU unless one is given.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "RTX 5090": 209e12, "RTX 5080": 113e12}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)


def retention_mixer_flops(num_layers: int, heads_q: int, heads_kv: int, head_dim: int, chunk: int) -> float:
    d = head_dim
    feats = d * (d + 1) // 2
    forward = (heads_q + heads_kv) * 2 * feats * (d + 1) + heads_q * 2 * chunk * (2 * d + 1)
    return 3.0 * num_layers * forward


def attention_mixer_flops(num_layers: int, seq_len: int, heads: int, d_qk: int, d_v: int) -> float:
    return 6.0 * num_layers * seq_len * heads * (d_qk + d_v)


def mixer_flops_per_token(config, seq_len: int) -> float:
    """The token mixer's FLOPs per token for one of our model configs (retention or MLA)."""
    model_type = getattr(config, "model_type", "")
    if model_type == "llmtrain_retention":
        from llmtrain.ops import default_chunk_size

        group = max(1, config.num_attention_heads // config.num_key_value_heads)
        chunk = config.chunk_size or default_chunk_size(seq_len, config.head_dim, "cuda", group)
        return retention_mixer_flops(config.num_hidden_layers, config.num_attention_heads,
                                     config.num_key_value_heads, config.head_dim, min(chunk, seq_len))
    if model_type == "llmtrain_mla":
        return attention_mixer_flops(config.num_hidden_layers, seq_len, config.num_attention_heads,
                                     config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim)
    raise ValueError(f"mixer_flops_per_token: unknown model type {model_type!r}")


def lookup_only_parameters(config) -> int:
    """Parameters used as lookup tables only: the input embedding unless it is tied to the lm_head."""
    return 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size


def flops_per_token(config, seq_len: int, num_params: int) -> dict:
    matmul = 6.0 * (num_params - lookup_only_parameters(config))
    mixer = mixer_flops_per_token(config, seq_len)
    return {"total": matmul + mixer, "matmul": matmul, "mixer": mixer}
