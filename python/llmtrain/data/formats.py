"""Supervised fine-tuning and preference data: dataset layouts -> chat messages -> token ids + loss masks,
and the collators that turn encoded examples into training batches.

Batches follow the same convention as pretraining: `labels[:, t]` is the token to predict after
`input_ids[:, t]` (already shifted), and -100 marks positions that do not count in the loss (prompts,
system and user turns, padding). Use `F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
_ROLES = {"user": "user", "human": "user", "prompter": "user", "assistant": "assistant", "gpt": "assistant",
          "bot": "assistant", "model": "assistant", "system": "system"}


# -- layouts -> messages -------------------------------------------------------------------------------
def to_messages(row: dict, layout: str) -> list[dict]:
    """One SFT row as chat messages. Layouts: "alpaca" (instruction, input, output), "dolly" (instruction,
    context, response), "flan" (inputs, targets), "messages" / "oasst" chat (a `messages` list of
    {role, content}; ShareGPT-style `conversations` with from/value also accepted)."""
    if layout == "alpaca":
        prompt = _join(row["instruction"], row.get("input", ""))
        return [_msg("user", prompt), _msg("assistant", row["output"])]
    if layout == "dolly":
        prompt = _join(row["instruction"], row.get("context", ""))
        return [_msg("user", prompt), _msg("assistant", row["response"])]
    if layout == "flan":
        return [_msg("user", row["inputs"]), _msg("assistant", row["targets"])]
    if layout in ("messages", "oasst", "chat"):
        turns = row.get("messages") or row.get("conversations")
        if not turns:
            raise ValueError(f"chat row has no 'messages' (keys: {sorted(row)})")
        return [_msg(t.get("role", t.get("from")), t.get("content", t.get("value"))) for t in turns]
    raise ValueError(f"unknown SFT layout {layout!r}; known: alpaca, dolly, flan, messages")


def _join(instruction: str, context: str) -> str:
    return f"{instruction.strip()}\n\n{context.strip()}" if context and context.strip() else instruction.strip()


def _msg(role: str, content: str) -> dict:
    try:
        role = _ROLES[role.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown chat role {role!r}; known: {sorted(_ROLES)}") from None
    if not isinstance(content, str):
        raise ValueError(f"message content must be text, got {type(content).__name__}")
    return {"role": role, "content": content}


def oasst_conversations(rows: Iterable[dict], lang: str | None = None) -> Iterator[list[dict]]:
    """Rebuild OpenAssistant (oasst1/oasst2) message trees into conversations: from each root prompt,
    follow the best-ranked reply (rank 0, else the first) down to a leaf. Deleted messages are skipped."""
    children: dict[str | None, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("deleted") or (lang is not None and row.get("lang") != lang):
            continue
        children[row.get("parent_id")].append(row)
    for root in children.get(None, []):
        conversation, node = [], root
        while node is not None:
            conversation.append(_msg(node["role"], node["text"]))
            replies = children.get(node["message_id"], [])
            node = min(replies, key=lambda r: (r.get("rank") is None, r.get("rank") or 0)) if replies else None
        if any(m["role"] == "assistant" for m in conversation):
            yield conversation


# -- preference pairs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreferencePair:
    prompt: list[dict]  # the conversation up to the final assistant turn
    chosen: str
    rejected: str


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh_dialogue(text: str) -> list[dict]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' (HH-RLHF) -> messages."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError(f"not an HH-RLHF dialogue (expected '\\n\\nHuman: ...'): {text[:60]!r}")
    return [_msg(role, content.strip()) for role, content in zip(parts[1::2], parts[2::2])]


def to_preference(row: dict, layout: str) -> PreferencePair:
    """Layouts: "hh-rlhf" (chosen/rejected full dialogues as text), "ultrafeedback" (chosen/rejected as
    message lists), "rewardbench" (prompt, chosen, rejected strings)."""
    if layout == "hh-rlhf":
        chosen, rejected = parse_hh_dialogue(row["chosen"]), parse_hh_dialogue(row["rejected"])
        return _pair_from_conversations(chosen, rejected)
    if layout == "ultrafeedback":
        chosen = [_msg(m["role"], m["content"]) for m in row["chosen"]]
        rejected = [_msg(m["role"], m["content"]) for m in row["rejected"]]
        return _pair_from_conversations(chosen, rejected)
    if layout == "rewardbench":
        return PreferencePair([_msg("user", row["prompt"])], row["chosen"], row["rejected"])
    raise ValueError(f"unknown preference layout {layout!r}; known: hh-rlhf, ultrafeedback, rewardbench")


def _pair_from_conversations(chosen: list[dict], rejected: list[dict]) -> PreferencePair:
    for conv in (chosen, rejected):
        if not conv or conv[-1]["role"] != "assistant":
            raise ValueError("a preference conversation must end with an assistant turn")
    # The shared prompt is the chosen side's history; HH-RLHF pairs differ only in the last turn.
    return PreferencePair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])


# -- encoding --------------------------------------------------------------------------------------------
def encode_messages(messages: list[dict], tokenizer, max_length: int | None = None) -> dict:
    """Apply the chat template; `loss_mask[i]` is 1 for tokens of assistant turns (their text and end-of-
    turn token) and 0 elsewhere. Truncates from the right to `max_length`."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if not any(mask) and any(m["role"] == "assistant" for m in messages):
        mask = _mask_by_prefixes(messages, tokenizer, ids)  # template without {% generation %} markers
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return {"input_ids": ids, "loss_mask": mask}


def _mask_by_prefixes(messages, tokenizer, ids) -> list[int]:
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=True, add_generation_prompt=True,
                                                  return_dict=True)["input_ids"])
        end = len(tokenizer.apply_chat_template(messages[:i + 1], tokenize=True, return_dict=True)["input_ids"])
        mask[start:end] = [1] * (min(end, len(ids)) - start)
    return mask


def encode_preference(pair: PreferencePair, tokenizer, max_length: int | None = None) -> dict:
    """Both completions of a pair, each with a loss mask over the final response only."""
    def encode(response: str) -> dict:
        enc = encode_messages(pair.prompt + [{"role": "assistant", "content": response}], tokenizer, max_length)
        prompt_len = len(tokenizer.apply_chat_template(pair.prompt, tokenize=True, add_generation_prompt=True,
                                                       return_dict=True)["input_ids"])
        enc["loss_mask"] = [0] * min(prompt_len, len(enc["loss_mask"])) + enc["loss_mask"][prompt_len:]
        return enc
    return {"chosen": encode(pair.chosen), "rejected": encode(pair.rejected)}


# -- collators -------------------------------------------------------------------------------------------
def _shifted(ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
    """Input tokens and their next-token targets, with non-response targets ignored."""
    inputs = ids[:-1]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
    return inputs, labels


class PaddingCollator:
    """Pad encoded examples (dicts with input_ids and loss_mask) on the right to the longest in the batch
    (rounded up to `pad_to_multiple_of`). Returns input_ids, labels, attention_mask as int64 tensors."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id, self.pad_to_multiple_of = pad_token_id, pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict:
        pairs = [_shifted(e["input_ids"], e["loss_mask"]) for e in examples]
        width = max(len(x) for x, _ in pairs)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(pairs), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(pairs), width), dtype=torch.long)
        for row, (x, y) in enumerate(pairs):
            input_ids[row, :len(x)] = torch.tensor(x, dtype=torch.long)
            labels[row, :len(y)] = torch.tensor(y, dtype=torch.long)
            attention[row, :len(x)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


class PackingCollator:
    """Pack encoded examples back to back into rows of exactly `seq_len` positions (greedy, in order;
    longer examples are truncated). Returns input_ids, labels, position_ids (restarting per example) and
    document_ids (example index within the row, -1 on padding) so attention can stay within examples."""

    def __init__(self, seq_len: int, pad_token_id: int):
        self.seq_len, self.pad_token_id = seq_len, pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        rows, current = [], []
        for e in examples:
            x, y = _shifted(e["input_ids"][: self.seq_len + 1], e["loss_mask"][: self.seq_len + 1])
            if current and sum(len(a) for a, _ in current) + len(x) > self.seq_len:
                rows.append(current)
                current = []
            current.append((x, y))
        if current:
            rows.append(current)
        shape = (len(rows), self.seq_len)
        batch = {"input_ids": torch.full(shape, self.pad_token_id, dtype=torch.long),
                 "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
                 "position_ids": torch.zeros(shape, dtype=torch.long),
                 "document_ids": torch.full(shape, -1, dtype=torch.long)}
        for r, row in enumerate(rows):
            at = 0
            for d, (x, y) in enumerate(row):
                n = len(x)
                batch["input_ids"][r, at:at + n] = torch.tensor(x, dtype=torch.long)
                batch["labels"][r, at:at + n] = torch.tensor(y, dtype=torch.long)
                batch["position_ids"][r, at:at + n] = torch.arange(n)
                batch["document_ids"][r, at:at + n] = d
                at += n
        return batch


class PreferenceCollator:
    """Pad the chosen and rejected sides of encoded pairs to one common width, so a DPO step can run
    both through the model as a single [2B, T] batch. Keys are prefixed chosen_ / rejected_."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.padder = PaddingCollator(pad_token_id, pad_to_multiple_of)

    def __call__(self, pairs: list[dict]) -> dict:
        both = self.padder([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
        b = len(pairs)
        return {f"{side}_{k}": (v[:b] if side == "chosen" else v[b:])
                for side in ("chosen", "rejected") for k, v in both.items()}
