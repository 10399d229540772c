"""`prepare` (the pipeline): stream documents, filter, tokenize in parallel, pack into shards with a train/val split.

    <out_dir>/shards/<phase>/train/train_00000.bin ...
    <out_dir>/shards/<phase>/val/val_00000.bin ...
    <out_dir>/shards/<phase>/meta.json          (source, tokenizer, filter counts, throughput)

The whole phase is built in a staging directory and swapped in only when complete, so an error (bad
file, empty input, Ctrl-C) leaves any shards from an earlier run exactly as they were.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llmtrain.data.filters import ExactDedup, LengthFilter, MinHashDedup, ToxicityFilter
from llmtrain.data.shards import write_shard
from llmtrain.data.sources import DataSourceError, iter_texts, resolve_source
from llmtrain.data.tokenizer import load_tokenizer, tokenizer_fingerprint, vocab_size

SPLITS = ("train", "val")


class EmptyDatasetError(DataSourceError):
    """No document survived reading and filtering, so there is nothing to write."""


@dataclass
class PrepareStats:
    source: str
    phase: str
    out_dir: str
    num_samples: int | None = None
    docs_read: int = 0
    docs_kept: dict = field(default_factory=lambda: {s: 0 for s in SPLITS})
    tokens: dict = field(default_factory=lambda: {s: 0 for s in SPLITS})
    shards: dict = field(default_factory=lambda: {s: 0 for s in SPLITS})
    dropped: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def docs_per_second(self) -> float:
        return self.docs_read / max(self.seconds, 1e-9)

    @property
    def tokens_per_second(self) -> float:
        return sum(self.tokens.values()) / max(self.seconds, 1e-9)

    def summary(self) -> str:
        return (f"{self.source} -> {self.out_dir}: read {self.docs_read} docs, kept {self.docs_kept['train']} "
                f"train / {self.docs_kept['val']} val, {self.tokens['train']:,} / {self.tokens['val']:,} tokens "
                f"in {self.shards['train']} / {self.shards['val']} shards; dropped {self.dropped}; "
                f"{self.seconds:.1f} s, {self.docs_per_second:,.0f} docs/s, {self.tokens_per_second:,.0f} tokens/s")


class _ShardPacker:
    """Appends documents to an in-memory buffer and writes a shard whenever it holds `shard_tokens`.
    Documents are never split across shards."""

    def __init__(self, directory: Path, prefix: str, shard_tokens: int, vocab: int, fingerprint: bytes):
        self.directory, self.prefix, self.shard_tokens = directory, prefix, shard_tokens
        self.vocab, self.fingerprint = vocab, fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)
        self._docs: list[np.ndarray] = []
        self._buffered = 0
        self.shards_written = 0

    def add(self, doc: np.ndarray) -> None:
        self._docs.append(doc)
        self._buffered += doc.size
        if self._buffered >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._docs:
            return
        lengths = np.fromiter((d.size for d in self._docs), dtype=np.int64, count=len(self._docs))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        path = self.directory / f"{self.prefix}_{self.shards_written:05d}.bin"
        write_shard(path, np.concatenate(self._docs), offsets, self.vocab, self.fingerprint)
        self.shards_written += 1
        self._docs, self._buffered = [], 0


def prepare(source: str | os.PathLike, out_dir: str | os.PathLike = "data", *, phase: str = "pretrain",
            tokenizer=None, num_samples: int | None = None, val_fraction: float = 0.01,
            shard_tokens: int = 100_000_000, min_tokens: int = 16, max_tokens: int | None = None,
            dedup: bool = True, near_dup_threshold: float | None = 0.8, toxicity_threshold: float | None = None,
            toxicity_scorer=None, text_field: str | None = None, split: str | None = None,
            txt_sample_by: str = "paragraph", batch_size: int = 512, progress: bool = True) -> PrepareStats:
    """Tokenize and pack a corpus into `<out_dir>/shards/<phase>/{train,val}/*.bin`.

    source: bundled name ("shakespeare"), catalog name ("fineweb-edu"), `owner/name` Hub repo, or local
    .txt/.jsonl/.json/.parquet files (a path, directory or glob). tokenizer: a fast tokenizer or a name
    for `load_tokenizer` (None = bundled BPE). Every `1/val_fraction`-th kept document goes to val.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if phase in ("", ".", "..") or "/" in phase or phase.startswith("."):
        raise ValueError(f"phase must be a plain directory name, got {phase!r}")
    resolved = resolve_source(source, split=split, text_field=text_field)
    if resolved.layout != "text":
        raise DataSourceError(f"{source!r} is a {resolved.layout}-layout dataset (fine-tuning/preference); "
                              f"prepare packs raw text for pretraining. Use llmtrain.data.formats for it.")
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    eos = tokenizer.eos_token_id
    vocab, fingerprint = vocab_size(tokenizer), tokenizer_fingerprint(tokenizer)
    token_dtype = np.uint16 if vocab <= 1 << 16 else np.uint32

    length = LengthFilter(min_tokens, max_tokens)
    exact = ExactDedup() if dedup else None
    near = MinHashDedup(threshold=near_dup_threshold) if near_dup_threshold is not None else None
    toxic = (ToxicityFilter(toxicity_threshold, scorer=toxicity_scorer)
             if toxicity_threshold is not None else None)

    shards_root = Path(out_dir) / "shards"
    final_dir = shards_root / phase
    staging = shards_root / f".{phase}.staging-{os.getpid()}"
    shards_root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    packers = {s: _ShardPacker(staging / s, s, shard_tokens, vocab, fingerprint) for s in SPLITS}
    stats = PrepareStats(source=str(source), phase=phase, out_dir=str(final_dir), num_samples=num_samples)
    kept_total = 0

    bar = _progress_bar(progress, f"prepare {phase}")
    start = time.perf_counter()
    try:
        for batch in _batches(iter_texts(resolved, num_samples, txt_sample_by), batch_size):
            stats.docs_read += len(batch)
            texts = [t for t in batch if t.strip()]
            stats.dropped["empty"] = stats.dropped.get("empty", 0) + len(batch) - len(texts)
            if exact is not None:
                texts = [t for t in texts if exact.keep(t)]
            if toxic is not None:
                texts = [t for t, ok in zip(texts, toxic.keep_batch(texts)) if ok]
            # The Rust tokenizer encodes a batch on all cores (rayon); this is the parallel step.
            for ids in _encode_batch(tokenizer, texts):
                if not length.keep(len(ids)) or (near is not None and not near.keep(ids)):
                    continue
                doc = np.empty(len(ids) + 1, dtype=token_dtype)
                doc[:-1] = ids
                doc[-1] = eos
                split_name = "val" if _goes_to_val(kept_total, val_fraction) else "train"
                packers[split_name].add(doc)
                stats.docs_kept[split_name] += 1
                stats.tokens[split_name] += doc.size
                kept_total += 1
            if bar is not None:
                bar.update(len(batch))
                elapsed = time.perf_counter() - start
                bar.set_postfix_str(f"{sum(stats.tokens.values()) / max(elapsed, 1e-9):,.0f} tokens/s")
        _record_drops(stats, length, exact, near, toxic)
        if kept_total == 0:
            raise EmptyDatasetError(f"{source}: no documents to write (read {stats.docs_read}, dropped "
                                    f"{stats.dropped}); existing shards in {final_dir} were left untouched")
        for packer in packers.values():
            packer.flush()
        stats.seconds = time.perf_counter() - start
        stats.shards = {s: packers[s].shards_written for s in SPLITS}
        _write_meta(staging / "meta.json", stats, tokenizer, vocab, fingerprint, resolved)
        _swap_in(staging, final_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return stats


def _goes_to_val(index: int, fraction: float) -> bool:
    """Deterministic, evenly spread split: document i is val when floor((i+1)f) > floor(if)."""
    return int((index + 1) * fraction) > int(index * fraction)


def _batches(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast skips offsets
    return [enc.ids for enc in encode(texts, add_special_tokens=False)]


def _record_drops(stats, length, exact, near, toxic) -> None:
    stats.dropped["length"] = length.dropped
    if exact is not None:
        stats.dropped["exact_duplicate"] = exact.dropped
    if near is not None:
        stats.dropped["near_duplicate"] = near.dropped
    if toxic is not None:
        stats.dropped["toxic"] = toxic.dropped


def _write_meta(path: Path, stats: PrepareStats, tokenizer, vocab, fingerprint, resolved) -> None:
    meta = {"format_version": 1, "phase": stats.phase, "source": stats.source,
            "hub_path": resolved.hub_path, "files": [str(p) for p in resolved.files],
            "tokenizer": getattr(tokenizer, "name_or_path", "") or "bundled", "vocab_size": vocab,
            "tokenizer_fingerprint": fingerprint.hex(), "eos_token_id": tokenizer.eos_token_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **{k: v for k, v in asdict(stats).items() if k not in ("source", "phase", "out_dir")}}
    path.write_text(json.dumps(meta, indent=2) + "\n")


def _swap_in(staging: Path, final_dir: Path) -> None:
    """Replace final_dir by staging. Two renames: the old tree moves aside before the new one lands."""
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
    os.replace(staging, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _progress_bar(enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc=desc, unit="doc", unit_scale=True, dynamic_ncols=True)
