"""Tokenizers: the bundled offline byte-level BPE, or any Hugging Face fast tokenizer by name or path.

Every tokenizer we hand out has eos/bos/pad tokens and a chat template, because the pretraining
packer needs EOS between documents, collators need a pad id and SFT formats need a template.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from llmtrain.data import assets

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, IM_START, IM_END]

# ChatML. The {% generation %} markers let `apply_chat_template(return_assistant_tokens_mask=True)`
# report which tokens belong to assistant turns; the loss mask is built from that.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def load_tokenizer(name_or_path: str | os.PathLike | None = None):
    """Return a `transformers.PreTrainedTokenizerFast`.

    None (the default) loads the bundled 8192-token byte-level BPE trained on the bundled corpus; it never
    touches the network. A directory or tokenizer.json path loads that file. Any other string is passed to
    `AutoTokenizer.from_pretrained` (which may download from the Hugging Face Hub, so only on request).
    Missing eos/bos/pad tokens and chat template are filled in so that downstream code can rely on them.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if name_or_path is None:
        tok = _load_bundled()
    else:
        path = Path(name_or_path)
        if path.is_file():
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
        else:
            tok = AutoTokenizer.from_pretrained(str(name_or_path))
        if not getattr(tok, "is_fast", False):
            raise ValueError(f"tokenizer {name_or_path!r} is not a fast (Rust) tokenizer; llmtrain needs one")
    _ensure_special_tokens(tok)
    return tok


def _load_bundled():
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(assets.tokenizer_file()),
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,  # GPT-2 convention: one token both opens and closes documents
        pad_token=PAD_TOKEN,
        model_max_length=1 << 20,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _ensure_special_tokens(tok) -> None:
    if tok.eos_token is None:  # a bare tokenizer.json carries no roles: recognise the usual names
        vocab = tok.get_vocab()
        known = [t for t in (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>") if t in vocab]
        if not known:
            raise ValueError("tokenizer has no eos token; packing documents needs one")
        tok.eos_token = known[0]
    if tok.pad_token is None and PAD_TOKEN in tok.get_vocab():
        tok.pad_token = PAD_TOKEN
    if tok.bos_token is None:
        tok.bos_token = tok.eos_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # padded positions are masked out of the loss anyway
    if not getattr(tok, "chat_template", None):
        tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
        tok.chat_template = CHAT_TEMPLATE


def vocab_size(tokenizer) -> int:
    """Size of the id space, including added tokens (len() counts them, .vocab_size does not)."""
    return len(tokenizer)


def tokenizer_fingerprint(tokenizer) -> bytes:
    """16-byte digest of the tokenizer's full serialized state; shards record it so that a loader can
    refuse to mix data tokenized differently."""
    return _fingerprint_of_json(tokenizer.backend_tokenizer.to_str())


@lru_cache(maxsize=8)
def _fingerprint_of_json(serialized: str) -> bytes:
    return hashlib.blake2b(serialized.encode(), digest_size=16).digest()
