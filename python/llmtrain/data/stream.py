"""Resumable, worker-aware iteration shared by the packed-shard dataset and the mixture.

A stream is a sequence of *units* (one window, or one batch of windows) that is a pure function of
(epoch, unit index). That makes three things simple:

* resume: the state is just (epoch, units consumed);
* DataLoader workers: worker w of W produces units start+w, start+w+W, ...; the DataLoader collects from
  its workers round-robin, so the batches come out in exactly the order of a single-process run;
* ranks: each rank owns a disjoint slice of every epoch (done by the subclasses).

Inside worker processes the dataset is a copy, so the consumer side counts: iterate through
`StatefulLoader` (or the dataset itself when there are no workers) and call `state_dict()` on either.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


class ResumableStream(IterableDataset):
    """Base class: subclasses define `units_per_epoch()` (None = endless) and `unit(epoch, index)`, and
    `_config()`, the settings that must match for a saved state to be meaningful."""

    def __init__(self):
        super().__init__()
        self._epoch = 0
        self._consumed = 0

    def units_per_epoch(self) -> int | None:
        raise NotImplementedError

    def unit(self, epoch: int, index: int):
        raise NotImplementedError

    def _config(self) -> dict:
        raise NotImplementedError

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Start iterating at the beginning of `epoch` (for trainers that count epochs themselves)."""
        self._epoch, self._consumed = int(epoch), 0

    def __len__(self) -> int:
        n = self.units_per_epoch()
        if n is None:
            raise TypeError(f"{type(self).__name__} is endless and has no length")
        return n

    def __iter__(self):
        total = self.units_per_epoch()
        worker = get_worker_info()
        first, step = (0, 1) if worker is None else (worker.id, worker.num_workers)
        index = self._consumed + first
        epoch = self._epoch
        while total is None or index < total:
            item = self.unit(epoch, index)
            if worker is None:
                self._consumed = index + 1  # counted before yielding: state_dict() taken now excludes it
            yield item
            index += step
        if worker is None:
            self._finish_epoch()

    def _finish_epoch(self) -> None:
        self._epoch += 1
        self._consumed = 0

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "consumed": self._consumed, "config": self._config()}

    def load_state_dict(self, state: dict) -> None:
        saved, current = state.get("config", {}), self._config()
        mismatched = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        if mismatched:
            details = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
            raise ValueError(f"cannot resume {type(self).__name__}: the data configuration changed ({details})")
        self._epoch, self._consumed = int(state["epoch"]), int(state["consumed"])


class StatefulLoader:
    """Iterate a ResumableStream through DataLoader worker processes while keeping its state exact.

    The DataLoader is built with batch_size=None (the stream already yields whole units) and
    persistent_workers=False, so every pass re-sends the current state to fresh workers.
    """

    def __init__(self, dataset: ResumableStream, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None, multiprocessing_context=None):
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context

    def __iter__(self):
        if self.num_workers == 0:
            for item in self.dataset:
                yield _pin(item) if self.pin_memory else item
            return
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor,
                            persistent_workers=False, multiprocessing_context=self.multiprocessing_context)
        for item in loader:
            self.dataset._consumed += 1
            yield item
        self.dataset._finish_epoch()

    def __len__(self) -> int:
        return len(self.dataset)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)


def _pin(item):
    if isinstance(item, torch.Tensor):
        return item.pin_memory()
    if isinstance(item, dict):
        return {k: _pin(v) for k, v in item.items()}
    if isinstance(item, tuple):
        return tuple(_pin(v) for v in item)
    return item
