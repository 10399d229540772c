"""`DataProcessor`: one call from a dataset name to an iterator of training batches.

    from llmtrain.data import DataProcessor
    for batch in DataProcessor(seq_len=256, batch_size=8).prepare_training_data("shakespeare"):
        ...  # batch["input_ids"], batch["labels"]: int64 [8, 256]

Pretraining corpora are tokenized into shards under `out_dir` (reused when the same source, sample count
and tokenizer were prepared before) and read back with PackedBinDataset. Fine-tuning and preference
datasets are encoded with the chat template and collated on the fly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from llmtrain.data.formats import (PaddingCollator, PreferenceCollator, encode_messages, encode_preference,
                                   oasst_conversations, to_messages, to_preference)
from llmtrain.data.loader import PackedBinDataset
from llmtrain.data.pipeline import prepare
from llmtrain.data.sources import iter_rows, resolve_source
from llmtrain.data.tokenizer import load_tokenizer, tokenizer_fingerprint

_PREFERENCE_LAYOUTS = {"hh-rlhf", "ultrafeedback", "rewardbench"}


class DataProcessor:
    def __init__(self, tokenizer=None, seq_len: int = 256, batch_size: int = 8, out_dir: str = "data",
                 seed: int = 0, num_workers: int = 0, progress: bool = False):
        self.tokenizer = tokenizer if tokenizer is not None and not isinstance(tokenizer, str) else load_tokenizer(tokenizer)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.out_dir, self.num_workers, self.progress = Path(out_dir), num_workers, progress

    def prepare_training_data(self, dataset_name: str = "shakespeare", num_samples: int | None = None,
                              split: str = "train", **prepare_kwargs) -> Iterator[dict]:
        """Batches of `{"input_ids", "labels", ...}` for one epoch. num_samples caps the documents (or
        examples) read from the source; split picks "train" or "val" shards for pretraining data."""
        source = resolve_source(dataset_name)
        if source.layout == "text":
            return self._pretraining_batches(dataset_name, num_samples, split, prepare_kwargs)
        if source.layout in _PREFERENCE_LAYOUTS:
            return self._preference_batches(source, num_samples)
        return self._sft_batches(source, num_samples)

    def _pretraining_batches(self, name, num_samples, split, prepare_kwargs):
        phase = re.sub(r"[^A-Za-z0-9_-]+", "_", str(name)).strip("_") or "dataset"
        phase_dir = self.out_dir / "shards" / phase
        if not self._is_prepared(phase_dir, name, num_samples):
            prepare(name, self.out_dir, phase=phase, tokenizer=self.tokenizer, num_samples=num_samples,
                    progress=self.progress, **prepare_kwargs)
        dataset = PackedBinDataset(phase_dir / split, self.seq_len, batch_size=self.batch_size, seed=self.seed,
                                   shuffle=split == "train",
                                   expected_fingerprint=tokenizer_fingerprint(self.tokenizer))
        for x, y in dataset.loader(num_workers=self.num_workers):
            yield {"input_ids": x, "labels": y}

    def _is_prepared(self, phase_dir: Path, name, num_samples) -> bool:
        meta_path = phase_dir / "meta.json"
        if not meta_path.exists():
            return False
        meta = json.loads(meta_path.read_text())
        return (meta.get("source") == str(name) and meta.get("num_samples") == num_samples
                and meta.get("tokenizer_fingerprint") == tokenizer_fingerprint(self.tokenizer).hex())

    def _examples(self, source, num_samples):
        rows = iter_rows(source, None if source.layout == "oasst" else num_samples)
        if source.layout == "oasst":
            conversations = oasst_conversations(rows)
            for i, conv in enumerate(conversations):
                if num_samples is not None and i >= num_samples:
                    return
                yield conv
        else:
            for row in rows:
                yield to_messages(row, source.layout)

    def _sft_batches(self, source, num_samples):
        collate = PaddingCollator(self.tokenizer.pad_token_id)
        batch = []
        for messages in self._examples(source, num_samples):
            encoded = encode_messages(messages, self.tokenizer, max_length=self.seq_len + 1)
            if not any(encoded["loss_mask"][1:]):
                continue  # the response was truncated away: nothing to learn from this example
            batch.append(encoded)
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
        if batch:
            yield collate(batch)

    def _preference_batches(self, source, num_samples):
        collate = PreferenceCollator(self.tokenizer.pad_token_id)
        batch = []
        for row in iter_rows(source, num_samples):
            batch.append(encode_preference(to_preference(row, source.layout), self.tokenizer,
                                           max_length=self.seq_len + 1))
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
        if batch:
            yield collate(batch)
