"""Pretraining data for the trainer: prepare shards once, then endless resumable batch streams.

`dataset` may be a directory of prepared shards (containing train/ and val/, or shards/pretrain/),
or anything `llmtrain.data.prepare` accepts (a bundled name such as "shakespeare", a catalog name,
local files). Prepared shards are cached under `data_dir` (default `<output_dir>/data`) and reused
when their source and tokenizer fingerprint match.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch.distributed as dist

from llmtrain.data.loader import PackedBinDataset
from llmtrain.data.shards import Shard, list_shards
from llmtrain.data.tokenizer import load_tokenizer, tokenizer_fingerprint, vocab_size


def _find_prepared(path: Path) -> Path | None:
    for candidate in (path, path / "shards" / "pretrain"):
        if (candidate / "train").is_dir() and (candidate / "val").is_dir():
            return candidate
    return None


def _prepared_matches(shards: Path, source: str, fingerprint: bytes) -> bool:
    try:
        meta = json.loads((shards / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("source") == source and meta.get("tokenizer_fingerprint") == fingerprint.hex()


def unigram_entropy(shard_dir: Path, vocab: int) -> float:
    """Entropy of the token distribution (nats/token): the loss of the best context-free model."""
    counts = np.zeros(vocab, dtype=np.int64)
    for path in list_shards(shard_dir):
        counts += np.bincount(Shard(path).tokens, minlength=vocab)[:vocab]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


class PretrainingData:
    def __init__(self, cfg, rank: int = 0, world_size: int = 1):
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.vocab_size = vocab_size(self.tokenizer)
        fingerprint = tokenizer_fingerprint(self.tokenizer)
        shards = _find_prepared(Path(cfg.dataset))
        if shards is None:
            data_dir = Path(cfg.data_dir or Path(cfg.output_dir) / "data")
            shards = data_dir / "shards" / "pretrain"
            if not _prepared_matches(shards, cfg.dataset, fingerprint):
                if rank == 0:
                    from llmtrain.data import prepare

                    prepare(cfg.dataset, data_dir, phase="pretrain", tokenizer=self.tokenizer,
                            progress=cfg.progress)
                if world_size > 1:
                    dist.barrier()
        self.shards = shards
        common = dict(seq_len=cfg.seq_len, batch_size=cfg.batch_size, rank=rank, world_size=world_size,
                      expected_fingerprint=fingerprint)
        self.train_set = PackedBinDataset(shards / "train", seed=cfg.seed, shuffle=True, **common)
        self.val_set = PackedBinDataset(shards / "val", seed=cfg.seed, shuffle=False, **common)
        if len(self.train_set) == 0:
            raise ValueError(f"{shards / 'train'}: fewer tokens than one batch of {cfg.batch_size} x "
                             f"{cfg.seq_len + 1}; lower batch_size/seq_len or add data")
        self.train = EndlessStream(self.train_set, cfg.num_workers)
        self._entropy = None

    @property
    def unigram_entropy(self) -> float:
        if self._entropy is None:
            self._entropy = unigram_entropy(self.shards / "train", self.vocab_size)
        return self._entropy

    def val_batches(self, n: int):
        """The first n validation batches, the same ones at every evaluation."""
        self.val_set.set_epoch(0)
        for i, batch in enumerate(self.val_set):
            if i >= n:
                break
            yield batch
        self.val_set.set_epoch(0)


class EndlessStream:
    """Batches epoch after epoch; state_dict() is the underlying stream's (epoch, position)."""

    def __init__(self, dataset: PackedBinDataset, num_workers: int = 0):
        self.dataset = dataset
        self.loader = dataset.loader(num_workers=num_workers)

    def __iter__(self):
        while True:
            yield from self.loader

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def build_pretraining_data(cfg, rank: int = 0, world_size: int = 1) -> PretrainingData:
    return PretrainingData(cfg, rank, world_size)
