"""Post-training data: dataset name -> checked, encoded examples, split into train and held-out sets.

Names resolve like everywhere else in llmtrain (bundled samples, catalog names, local files), plus the
Hub ids of catalogued datasets ("databricks-dolly-15k", "databricks/databricks-dolly-15k",
"Anthropic/hh-rlhf"). Local files of unknown layout are recognised from the keys of their first row.

Every row is checked before training starts; a bad one raises DatasetFormatError naming the dataset,
the row and the problem (missing fields, an empty response, a prompt that leaves no room for the
response in max_length), unless skip_invalid is set, in which case it is counted and dropped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from llmtrain.data.catalog import DATASETS
from llmtrain.data.formats import encode_messages, encode_preference, oasst_conversations, to_messages, to_preference
from llmtrain.data.sources import Source, iter_rows, resolve_source

SFT_LAYOUTS = {"alpaca", "dolly", "flan", "messages", "chat", "oasst"}
PREFERENCE_LAYOUTS = {"hh-rlhf", "ultrafeedback", "rewardbench"}


class DatasetFormatError(ValueError):
    """A row of a post-training dataset cannot be used; the message names the dataset and the row.
    `reason` is the short kind of problem, for counting rows dropped under skip_invalid."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def resolve_posttrain_source(name: str, dataset_format: str = "auto") -> Source:
    """A Source with a post-training layout: catalog Hub ids are mapped to their catalog entry, and local
    files get their layout from `dataset_format` or from the keys of their first row."""
    for info in DATASETS:  # "databricks-dolly-15k", "databricks/databricks-dolly-15k", "Anthropic/hh-rlhf"
        if name.lower() in (info.hf_path.lower(), info.hf_path.split("/")[-1].lower()):
            name = info.name
            break
    source = resolve_source(name)
    if dataset_format not in ("auto", source.layout):
        return _with_layout(source, dataset_format)
    if source.layout == "text" and source.is_local:
        first = next(iter_rows(source, 1), None)
        if first is None:
            raise DatasetFormatError(f"{name}: no rows")
        return _with_layout(source, detect_layout(first, name))
    return source


def _with_layout(source: Source, layout: str) -> Source:
    from dataclasses import replace

    return replace(source, layout=layout)


def detect_layout(row: dict, name: str) -> str:
    keys = set(row)
    if {"prompt", "chosen", "rejected"} <= keys:
        return "rewardbench"
    if {"chosen", "rejected"} <= keys:
        return "hh-rlhf" if isinstance(row["chosen"], str) else "ultrafeedback"
    if "messages" in keys or "conversations" in keys:
        return "messages"
    if {"instruction", "response"} <= keys:
        return "dolly"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"inputs", "targets"} <= keys:
        return "flan"
    raise DatasetFormatError(
        f"{name}: cannot tell the layout from the first row's keys {sorted(keys)}; expected instruction/"
        f"response (dolly), instruction/output (alpaca), inputs/targets (flan), messages (chat), chosen/"
        f"rejected (preferences) or prompt/chosen/rejected; or set dataset_format")


def _rows(source: Source, num_samples):
    """(row number, messages-or-row) in file order; oasst trees are rebuilt into conversations first."""
    if source.layout == "oasst":
        for i, conv in enumerate(oasst_conversations(iter_rows(source))):
            if num_samples is not None and i >= num_samples:
                return
            yield i, conv
    else:
        yield from enumerate(iter_rows(source, num_samples))


@dataclass
class Dropped:
    """Rows skipped under skip_invalid, by reason (reported at the start of training)."""
    counts: dict

    def add(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1

    def __str__(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in self.counts.items()) or "none"


def _prompt_length(tokenizer, prompt: list[dict]) -> int:
    return len(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                             return_dict=True)["input_ids"])


def _check_fits(where: str, prompt_tokens: int, max_length: int) -> None:
    # the response needs at least one scored token after the prompt (and the shift costs one position)
    if prompt_tokens + 1 >= max_length:
        raise DatasetFormatError(f"{where}: the prompt is {prompt_tokens} tokens, longer than the context "
                                 f"(max_length {max_length}) leaves room for; raise max_length or skip_invalid",
                                 "prompt longer than the context")


_REQUIRED = {"dolly": ("instruction", "response"), "alpaca": ("instruction", "output"), "flan": ("inputs", "targets"),
             "hh-rlhf": ("chosen", "rejected"), "ultrafeedback": ("chosen", "rejected"),
             "rewardbench": ("prompt", "chosen", "rejected")}


def _parse(where: str, build, row: dict | None = None, layout: str | None = None):
    # Readers that unify columns across rows (datasets' json) turn a missing field into None.
    for key in _REQUIRED.get(layout, ()):
        if row is not None and row.get(key) is None:
            raise DatasetFormatError(f"{where}: missing field {key!r} (a {layout} row needs "
                                     f"{', '.join(_REQUIRED[layout])})", "missing field")
    try:
        return build()
    except KeyError as exc:
        raise DatasetFormatError(f"{where}: missing field {exc}", "missing field") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise DatasetFormatError(f"{where}: {exc}", "malformed row") from None


def load_sft_examples(source: Source, tokenizer, max_length: int, num_samples=None,
                      skip_invalid: bool = False) -> tuple[list[dict], Dropped]:
    """Encoded examples {input_ids, loss_mask} with the chat template; loss_mask covers assistant turns."""
    if source.layout not in SFT_LAYOUTS:
        raise DatasetFormatError(f"{source.spec}: a {source.layout} dataset, not instruction/chat data for SFT")
    examples, dropped = [], Dropped({})
    for i, row in _rows(source, num_samples):
        where = f"{source.spec} row {i}"
        try:
            messages = row if source.layout == "oasst" else _parse(where, lambda: to_messages(row, source.layout), row, source.layout)
            replies = [m for m in messages if m["role"] == "assistant"]
            if not replies:
                raise DatasetFormatError(f"{where}: no assistant turn to learn from", "no response")
            if any(not m["content"].strip() for m in replies):
                raise DatasetFormatError(f"{where}: empty response", "empty response")
            first_reply = next(j for j, m in enumerate(messages) if m["role"] == "assistant")
            _check_fits(where, _prompt_length(tokenizer, messages[:first_reply]), max_length)
        except DatasetFormatError as exc:
            if not skip_invalid:
                raise
            dropped.add(exc.reason)
            continue
        # +1: the collators shift by one, so max_length + 1 tokens give max_length positions
        examples.append(encode_messages(messages, tokenizer, max_length=max_length + 1))
    return examples, dropped


def load_preference_pairs(source: Source, tokenizer, max_length: int, num_samples=None,
                          skip_invalid: bool = False) -> tuple[list[dict], Dropped]:
    """Encoded pairs {chosen: {input_ids, loss_mask}, rejected: {...}}; masks cover the final response."""
    if source.layout not in PREFERENCE_LAYOUTS:
        raise DatasetFormatError(f"{source.spec}: a {source.layout} dataset, not preference pairs "
                                 f"(chosen/rejected)")
    pairs, dropped = [], Dropped({})
    for i, row in _rows(source, num_samples):
        where = f"{source.spec} row {i}"
        try:
            pair = _parse(where, lambda: to_preference(row, source.layout), row, source.layout)
            for side in ("chosen", "rejected"):
                if not isinstance(getattr(pair, side), str) or not getattr(pair, side).strip():
                    raise DatasetFormatError(f"{where}: empty {side} response", "empty response")
            _check_fits(where, _prompt_length(tokenizer, pair.prompt), max_length)
        except DatasetFormatError as exc:
            if not skip_invalid:
                raise
            dropped.add(exc.reason)
            continue
        pairs.append(encode_preference(pair, tokenizer, max_length=max_length + 1))
    return pairs, dropped


def load_prompts(source: Source, tokenizer, max_prompt_length: int, num_samples=None,
                 skip_invalid: bool = False) -> tuple[list[list[int]], Dropped]:
    """Prompt token ids for PPO rollouts (ending with the assistant generation prompt): the conversation
    up to its last assistant turn, from SFT or preference data alike."""
    prompts, dropped = [], Dropped({})
    for i, row in _rows(source, num_samples):
        where = f"{source.spec} row {i}"
        try:
            if source.layout in PREFERENCE_LAYOUTS:
                messages = _parse(where, lambda: to_preference(row, source.layout), row, source.layout).prompt
            else:
                messages = row if source.layout == "oasst" else _parse(where, lambda: to_messages(row, source.layout), row, source.layout)
                last = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
                messages = messages[:last]
            if not messages or not any(m["content"].strip() for m in messages):
                raise DatasetFormatError(f"{where}: empty prompt", "empty prompt")
            ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                return_dict=True)["input_ids"]
            if len(ids) > max_prompt_length:
                raise DatasetFormatError(f"{where}: the prompt is {len(ids)} tokens, longer than the context "
                                         f"for prompts (max_prompt_length {max_prompt_length})",
                                         "prompt longer than the context")
        except DatasetFormatError as exc:
            if not skip_invalid:
                raise
            dropped.add(exc.reason)
            continue
        prompts.append(list(ids))
    return prompts, dropped


def split_held_out(items: list, eval_fraction: float, max_eval: int, seed: int) -> tuple[list, list]:
    """A fixed random held-out set (at least one item when eval_fraction > 0 and there are 2+ items)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = min(max_eval, int(round(len(items) * eval_fraction))) if eval_fraction > 0 else 0
    if eval_fraction > 0 and len(items) >= 2:
        n_eval = max(1, n_eval)
    held = sorted(order[:n_eval])
    train = sorted(order[n_eval:])
    return [items[i] for i in train], [items[i] for i in held]


def preference_splits(cfg, tokenizer) -> tuple[list[dict], list[dict]]:
    """cfg.dataset's preference pairs, tokenised and filtered, split into train / held-out (reward
    model and DPO read the same data)."""
    source = resolve_posttrain_source(cfg.dataset, cfg.dataset_format)
    pairs, dropped = load_preference_pairs(source, tokenizer, cfg.max_length, cfg.num_samples, cfg.skip_invalid)
    if dropped.counts:
        print(f"{cfg.dataset}: dropped {dropped}")
    return split_held_out(pairs, cfg.eval_fraction, cfg.max_eval_examples, cfg.seed)
