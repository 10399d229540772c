"""Weighted mixtures of packed sources, e.g. web + code + math, or old + new data for continual training.

Sample k of the mixture comes from source s_k, drawn i.i.d. with the given weights from a generator seeded
by (seed, k // CHUNK); it is that source's next unread window in its own epoch order (each source cycles
through its epochs independently). Because the draw for sample k is a pure function of k, the mixture is
resumable and splits across DataLoader workers like any ResumableStream.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from llmtrain.data.loader import PackedBinDataset
from llmtrain.data.stream import ResumableStream, StatefulLoader

_CHUNK = 8192  # samples whose source draws come from one generator


class MixtureDataset(ResumableStream):
    """Mix PackedBinDatasets by weight.

    sources: PackedBinDatasets built with batch_size=None (their seq_len must agree); their rank/world
        size settings decide which windows this rank sees.
    weights: non-negative, normalised here. num_samples: windows per epoch of the mixture (None: endless).
    batch_size: None yields single windows, an int yields stacked batches.

    Continual pretraining: `MixtureDataset([old, new], weights=[0.3, 0.7])` replays old data while
    learning the new, which limits forgetting.
    """

    def __init__(self, sources: Sequence[PackedBinDataset], weights: Sequence[float], *, seed: int = 0,
                 batch_size: int | None = None, num_samples: int | None = None):
        super().__init__()
        if len(sources) == 0 or len(sources) != len(weights):
            raise ValueError(f"need one weight per source, got {len(sources)} sources and {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
        seq_lens = {s.seq_len for s in sources}
        if len(seq_lens) != 1 or any(s.batch_size is not None for s in sources):
            raise ValueError("mixture sources need the same seq_len and batch_size=None")
        if len({(s.vocab_size, s.fingerprint) for s in sources}) != 1:
            raise ValueError("mixture sources were tokenized with different tokenizers")
        self.sources, self.weights = list(sources), w / w.sum()
        self.seed, self.batch_size, self.num_samples = seed, batch_size, num_samples
        self._chunk_draws: dict[int, np.ndarray] = {}
        self._chunk_prefix: list[np.ndarray] = [np.zeros(len(sources), dtype=np.int64)]  # counts before chunk c

    def _draws(self, chunk: int) -> np.ndarray:
        if chunk not in self._chunk_draws:
            rng = np.random.default_rng([self.seed, chunk])
            self._chunk_draws[chunk] = rng.choice(len(self.sources), size=_CHUNK, p=self.weights)
        return self._chunk_draws[chunk]

    def _counts_before(self, k: int) -> np.ndarray:
        """How many of samples 0..k-1 came from each source."""
        chunk, within = divmod(k, _CHUNK)
        while len(self._chunk_prefix) <= chunk:
            c = len(self._chunk_prefix) - 1
            counts = np.bincount(self._draws(c), minlength=len(self.sources))
            self._chunk_prefix.append(self._chunk_prefix[-1] + counts)
        head = np.bincount(self._draws(chunk)[:within], minlength=len(self.sources))
        return self._chunk_prefix[chunk] + head

    def source_of(self, k: int) -> int:
        return int(self._draws(k // _CHUNK)[k % _CHUNK])

    def sample_at(self, k: int):
        """Global mixture sample k: (source index, that source's sample)."""
        s = self.source_of(k)
        j = int(self._counts_before(k)[s])  # this is source s's j-th draw
        source = self.sources[s]
        per_epoch = source.windows_per_epoch()
        epoch, index = divmod(j, per_epoch)
        return s, source.sample(int(source._rank_windows(epoch)[index]))

    def units_per_epoch(self) -> int | None:
        if self.num_samples is None:
            return None
        return self.num_samples if self.batch_size is None else self.num_samples // self.batch_size

    def unit(self, epoch: int, index: int):
        per_unit = 1 if self.batch_size is None else self.batch_size
        base = (epoch * self.num_samples if self.num_samples is not None else 0) + index * per_unit
        samples = [self.sample_at(base + i)[1] for i in range(per_unit)]
        if self.batch_size is None:
            return samples[0]
        if isinstance(samples[0], dict):
            return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])

    def _config(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "num_samples": self.num_samples,
                "weights": [round(float(w), 12) for w in self.weights],
                "sources": [s._config() for s in self.sources]}

    def loader(self, num_workers: int = 0, **kwargs) -> StatefulLoader:
        return StatefulLoader(self, num_workers=num_workers, **kwargs)
