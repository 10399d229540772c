"""`PackedBinDataset`: training windows read straight from memory-mapped `.bin` shards.

Each shard of n tokens holds (n - 1) // seq_len windows; window j covers tokens
[j * seq_len, (j + 1) * seq_len + 1), giving input = window[:-1] and target = window[1:]. An epoch is a
permutation of all windows drawn from (seed, epoch); ranks take interleaved, equal-sized slices of it, and
with `batch_size` set each unit is a stacked batch, so the stream is identical whatever the number of
DataLoader workers (see stream.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from llmtrain.data.shards import Shard, ShardFormatError, list_shards
from llmtrain.data.stream import ResumableStream, StatefulLoader


class PackedBinDataset(ResumableStream):
    """Windows of `seq_len + 1` tokens from packed shards.

    path: a directory of shards (e.g. data/shards/pretrain/train), one `.bin` file, or a list of files.
    batch_size: None yields single windows (input [T], target [T]); an int yields stacked batches
        [batch_size, T] and drops the last partial batch so all ranks take the same number of steps.
    rank, world_size: distributed slice. even_ranks=True trims the epoch to a multiple of world_size so
        that ranks stay in lockstep; False gives every window to exactly one rank, some ranks one more.
    return_doc_info: yield dicts with `position_ids` (restarting at each document) and `document_ids`
        (segment index within the window), for attention that stops at document boundaries.
    curriculum: "short_first" orders the first `curriculum_epochs` epochs by the length of the documents
        in each window, shortest first (ties shuffled by seed); None shuffles every epoch uniformly.
    """

    def __init__(self, path, seq_len: int, *, batch_size: int | None = None, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, even_ranks: bool = True,
                 return_doc_info: bool = False, curriculum: str | None = None, curriculum_epochs: int = 1,
                 expected_fingerprint: bytes | str | None = None, check_tokens: bool = True):
        super().__init__()
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if curriculum not in (None, "short_first"):
            raise ValueError(f"curriculum must be None or 'short_first', got {curriculum!r}")
        self.seq_len, self.batch_size, self.seed, self.shuffle = seq_len, batch_size, seed, shuffle
        self.rank, self.world_size, self.even_ranks = rank, world_size, even_ranks
        self.return_doc_info, self.curriculum, self.curriculum_epochs = return_doc_info, curriculum, curriculum_epochs

        self.shards = [Shard(p, check_tokens=check_tokens) for p in _shard_paths(path)]
        first = self.shards[0].header
        for shard in self.shards[1:]:
            if (shard.header.vocab_size, shard.header.fingerprint) != (first.vocab_size, first.fingerprint):
                raise ShardFormatError(f"{shard.path}: tokenizer (vocab {shard.header.vocab_size}, fingerprint "
                                       f"{shard.header.fingerprint.hex()}) differs from {self.shards[0].path} "
                                       f"(vocab {first.vocab_size}, fingerprint {first.fingerprint.hex()})")
        if expected_fingerprint is not None:
            expected = (bytes.fromhex(expected_fingerprint) if isinstance(expected_fingerprint, str)
                        else bytes(expected_fingerprint))
            if expected != first.fingerprint:
                raise ShardFormatError(f"{self.shards[0].path}: shards were tokenized with tokenizer "
                                       f"{first.fingerprint.hex()}, expected {expected.hex()}")
        self.vocab_size, self.fingerprint = first.vocab_size, first.fingerprint

        counts = np.array([max(0, (s.num_tokens - 1) // seq_len) for s in self.shards], dtype=np.int64)
        self._window_starts = np.concatenate([[0], np.cumsum(counts)])  # global index of each shard's first
        self.num_windows = int(self._window_starts[-1])
        if self.num_windows == 0:
            raise ValueError(f"no window of seq_len + 1 = {seq_len + 1} tokens fits in any shard of {path}")
        self._cached_epoch: int | None = None
        self._cached_order: np.ndarray | None = None

    # -- the epoch's order -----------------------------------------------------------------------------
    def _rank_windows(self, epoch: int) -> np.ndarray:
        """Global window ids this rank visits in `epoch`, in order."""
        if self._cached_epoch != epoch:
            order = self._epoch_order(epoch)
            if self.even_ranks:
                order = order[: len(order) - len(order) % self.world_size]
            self._cached_order, self._cached_epoch = order[self.rank::self.world_size], epoch
        return self._cached_order

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_windows)
        rng = np.random.default_rng([self.seed, epoch])
        if self.curriculum == "short_first" and epoch < self.curriculum_epochs:
            docs_in_window = self._docs_per_window()
            tie_break = rng.random(self.num_windows)
            return np.lexsort((tie_break, -docs_in_window))  # more documents per window = shorter ones
        return rng.permutation(self.num_windows)

    def _docs_per_window(self) -> np.ndarray:
        parts = []
        for shard, count in zip(self.shards, np.diff(self._window_starts)):
            starts = np.arange(count, dtype=np.int64) * self.seq_len
            offsets = shard.doc_offsets
            first = np.searchsorted(offsets, starts, side="right") - 1
            last = np.searchsorted(offsets, starts + self.seq_len - 1, side="right") - 1
            parts.append(last - first + 1)
        return np.concatenate(parts)

    # -- units -----------------------------------------------------------------------------------------
    def windows_per_epoch(self) -> int:
        return len(self._rank_windows(self._epoch))

    def units_per_epoch(self) -> int:
        n = self.windows_per_epoch()
        return n if self.batch_size is None else n // self.batch_size

    def unit(self, epoch: int, index: int):
        order = self._rank_windows(epoch)
        if self.batch_size is None:
            return self.sample(int(order[index]))
        ids = order[index * self.batch_size:(index + 1) * self.batch_size]
        samples = [self.sample(int(i)) for i in ids]
        if self.return_doc_info:
            return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])

    def sample(self, window_id: int):
        """One window by global id: (input, target) int64 tensors, or a dict with document info."""
        shard_idx = int(np.searchsorted(self._window_starts, window_id, side="right") - 1)
        shard = self.shards[shard_idx]
        start = (window_id - int(self._window_starts[shard_idx])) * self.seq_len
        window = torch.from_numpy(shard.tokens[start:start + self.seq_len + 1].astype(np.int64))
        x, y = window[:-1], window[1:]
        if not self.return_doc_info:
            return x, y
        positions = np.arange(start, start + self.seq_len)
        doc_index = np.searchsorted(shard.doc_offsets, positions, side="right") - 1
        return {"input_ids": x, "labels": y,
                "position_ids": torch.from_numpy(positions - shard.doc_offsets[doc_index]),
                "document_ids": torch.from_numpy(doc_index - doc_index[0])}

    def _config(self) -> dict:
        return {"seq_len": self.seq_len, "batch_size": self.batch_size, "seed": self.seed,
                "shuffle": self.shuffle, "world_size": self.world_size, "even_ranks": self.even_ranks,
                "num_windows": self.num_windows, "curriculum": self.curriculum,
                "fingerprint": self.fingerprint.hex()}

    def loader(self, num_workers: int = 0, **kwargs) -> StatefulLoader:
        """A DataLoader-backed iterator whose state_dict() stays exact with worker processes."""
        return StatefulLoader(self, num_workers=num_workers, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cached_order"], state["_cached_epoch"] = None, None  # recomputed in the worker
        return state


def _shard_paths(path) -> list[Path]:
    if isinstance(path, (str, os.PathLike)):
        p = Path(path)
        paths = list_shards(p) if p.is_dir() else [p]
    else:
        paths = [Path(x) for x in path]
    if not paths:
        raise FileNotFoundError(f"no .bin shards in {path}")
    return paths
