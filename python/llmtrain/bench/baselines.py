"""Dense baselines for ``llmtrain bench train``: GPT-2- and Llama-style transformers on SDPA.

Written the way a strong baseline is run (nanoGPT style): causal ``scaled_dot_product_attention``
(flash attention on the GPU), bf16 autocast, fused AdamW, the whole forward + loss under
``torch.compile``. Sized from the benchmarked model's config (width, depth, heads, vocabulary; the
Llama MLP takes its intermediate size) so that the parameter counts match to a few percent; the
bench prints both counts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, bias: bool, rope: bool, rope_theta: float = 500000.0):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=bias)
        self.proj = nn.Linear(hidden, hidden, bias=bias)
        self.rope, self.rope_theta = rope, rope_theta

    def _rotate(self, x):  # x [b, h, t, d]; Llama's rotate-half layout
        t, d = x.shape[-2], x.shape[-1]
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
        ang = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * inv
        ang = torch.cat((ang, ang), dim=-1)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        half = d // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def forward(self, x):
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rope:
            q, k = self._rotate(q), self._rotate(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, h))


class _Block(nn.Module):
    def __init__(self, kind: str, hidden: int, heads: int, intermediate: int):
        super().__init__()
        gpt2 = kind == "gpt2"
        norm = (lambda: nn.LayerNorm(hidden)) if gpt2 else (lambda: nn.RMSNorm(hidden, eps=1e-6))
        self.norm1, self.norm2 = norm(), norm()
        self.attn = _Attention(hidden, heads, bias=gpt2, rope=not gpt2)
        self.gpt2 = gpt2
        if gpt2:
            self.fc, self.out = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)
        else:
            self.fc, self.out = nn.Linear(hidden, 2 * intermediate, bias=False), nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        u = self.fc(self.norm2(x))
        if self.gpt2:
            u = F.gelu(u, approximate="tanh")
        else:
            gate, up = u.chunk(2, dim=-1)
            u = F.silu(gate) * up
        return x + self.out(u)


class DenseLM(nn.Module):
    """A decoder-only LM; ``forward(input_ids, targets)`` returns the mean cross-entropy."""

    def __init__(self, kind: str, vocab_size: int, hidden: int, layers: int, heads: int, intermediate: int,
                 max_seq_len: int, tie_embeddings: bool = True):
        super().__init__()
        if kind not in ("gpt2", "llama"):
            raise ValueError(f"baseline must be 'gpt2' or 'llama', got {kind!r}")
        if hidden % heads:
            raise ValueError(f"baseline: hidden size {hidden} is not a multiple of {heads} heads")
        self.kind, self.heads, self.num_layers, self.hidden = kind, heads, layers, hidden
        self.embed = nn.Embedding(vocab_size, hidden)
        self.pos = nn.Embedding(max_seq_len, hidden) if kind == "gpt2" else None
        self.blocks = nn.ModuleList(_Block(kind, hidden, heads, intermediate) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden) if kind == "gpt2" else nn.RMSNorm(hidden, eps=1e-6)
        self.lm_head = nn.Linear(hidden, vocab_size, bias=False)
        self.tied = tie_embeddings
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.checkpointing = False
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith(("attn.proj.weight", "out.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def lookup_only_parameters(self) -> int:
        n = self.pos.weight.numel() if self.pos is not None else 0
        return n + (0 if self.tied else self.embed.weight.numel())

    def forward(self, input_ids, targets):
        x = self.embed(input_ids)
        if self.pos is not None:
            x = x + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointing and self.training else block(x)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1), ignore_index=-100)


def baseline_for(kind: str, config, seq_len: int) -> DenseLM:
    """A GPT-2- or Llama-style model as wide and deep as ``config`` (one of our model configs)."""
    hidden, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    if hidden % heads:
        heads = max(1, hidden // 64)
    return DenseLM(kind, config.vocab_size, hidden, layers, heads, config.intermediate_size, seq_len,
                   tie_embeddings=bool(config.tie_word_embeddings))


def baseline_flops_per_token(model: DenseLM, seq_len: int) -> dict:
    n = sum(p.numel() for p in model.parameters())
    matmul = 6.0 * (n - model.lookup_only_parameters())
    d = model.hidden // model.heads
    mixer = 6.0 * model.num_layers * seq_len * model.heads * 2 * d
    return {"total": matmul + mixer, "matmul": matmul, "mixer": mixer}
