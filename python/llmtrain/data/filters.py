"""Quality filters applied while preparing a corpus: length, exact duplicates, near duplicates, toxicity.

Each filter answers "keep this document?" and counts what it dropped, so `prepare` can report why the
corpus shrank.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import defaultdict

import numpy as np

_WHITESPACE = re.compile(r"\s+")


class LengthFilter:
    """Drops documents with fewer than `min_tokens` or more than `max_tokens` tokens (None = no bound)."""

    def __init__(self, min_tokens: int = 1, max_tokens: int | None = None):
        if max_tokens is not None and max_tokens < min_tokens:
            raise ValueError(f"max_tokens {max_tokens} < min_tokens {min_tokens}")
        self.min_tokens, self.max_tokens = min_tokens, max_tokens
        self.dropped = 0

    def keep(self, num_tokens: int) -> bool:
        ok = num_tokens >= self.min_tokens and (self.max_tokens is None or num_tokens <= self.max_tokens)
        self.dropped += not ok
        return ok


class ExactDedup:
    """Drops documents whose normalized text (NFC, case-folded, whitespace collapsed) was seen before.
    Keeps 16 bytes per distinct document."""

    def __init__(self):
        self._seen: set[bytes] = set()
        self.dropped = 0

    def keep(self, text: str) -> bool:
        normalized = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text).casefold()).strip()
        digest = hashlib.blake2b(normalized.encode(), digest_size=16).digest()
        if digest in self._seen:
            self.dropped += 1
            return False
        self._seen.add(digest)
        return True


class MinHashDedup:
    """Near-duplicate filter: MinHash signatures over token n-gram shingles with LSH banding.

    A document is dropped when it shares an LSH bucket with an earlier kept document and their signatures
    agree on at least `threshold` of the hash functions (an estimate of shingle Jaccard similarity).
    Shingles are n-grams of token ids, which are already computed and cheaper to hash than words.
    Hash functions are multiply-shift on 64-bit integers: h_i(x) = (a_i * x + b_i) mod 2^64 >> 32.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, bands: int = 16, ngram: int = 8,
                 seed: int = 0):
        if num_perm % bands:
            raise ValueError(f"num_perm ({num_perm}) must be a multiple of bands ({bands})")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold, self.num_perm, self.bands, self.ngram = threshold, num_perm, bands, ngram
        rng = np.random.default_rng(seed)
        self._a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)  # odd multipliers
        self._b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self._buckets: list[defaultdict[bytes, list[int]]] = [defaultdict(list) for _ in range(bands)]
        self._signatures: list[np.ndarray] = []
        self.dropped = 0

    def signature(self, token_ids) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.uint64)
        n = self.ngram if ids.size >= self.ngram else max(ids.size, 1)
        if ids.size == 0:
            shingles = np.zeros(1, dtype=np.uint64)
        else:
            # Polynomial rolling combination of n consecutive ids into one 64-bit shingle value.
            windows = np.lib.stride_tricks.sliding_window_view(ids, n)
            shingles = np.zeros(windows.shape[0], dtype=np.uint64)
            with np.errstate(over="ignore"):
                for j in range(n):
                    shingles = shingles * np.uint64(0x100000001B3) + windows[:, j]
            shingles = np.unique(shingles)
        with np.errstate(over="ignore"):
            hashed = (shingles[:, None] * self._a[None, :] + self._b[None, :]) >> np.uint64(32)
        return hashed.min(axis=0).astype(np.uint32)

    def keep(self, token_ids) -> bool:
        sig = self.signature(token_ids)
        band_keys = [sig_band.tobytes() for sig_band in np.split(sig, self.bands)]
        candidates = {idx for band, key in enumerate(band_keys) for idx in self._buckets[band].get(key, ())}
        for idx in candidates:
            if np.mean(self._signatures[idx] == sig) >= self.threshold:
                self.dropped += 1
                return False
        idx = len(self._signatures)
        self._signatures.append(sig)
        for band, key in enumerate(band_keys):
            self._buckets[band][key].append(idx)
        return True


class ToxicityFilter:
    """Drops documents whose toxicity score is >= `threshold`.

    `scorer` maps a list of texts to a list of scores in [0, 1]. The default uses `detoxify` (an optional
    dependency, which downloads its model checkpoint on first use); without it, asking for this filter
    is an error rather than a silent no-op.
    """

    def __init__(self, threshold: float = 0.5, scorer=None, model: str = "original"):
        self.threshold = threshold
        self.scorer = scorer if scorer is not None else _detoxify_scorer(model)
        self.dropped = 0

    def keep_batch(self, texts: list[str]) -> list[bool]:
        if not texts:
            return []
        scores = list(self.scorer(texts))
        if len(scores) != len(texts):
            raise ValueError(f"toxicity scorer returned {len(scores)} scores for {len(texts)} texts")
        keep = [float(s) < self.threshold for s in scores]
        self.dropped += keep.count(False)
        return keep


def detoxify_available() -> bool:
    try:
        import detoxify  # noqa: F401
    except ImportError:
        return False
    return True


def _detoxify_scorer(model: str):
    try:
        from detoxify import Detoxify
    except ImportError as e:
        raise RuntimeError("the toxicity filter needs the optional package `detoxify` "
                           "(pip install detoxify)") from e
    detector = Detoxify(model)
    return lambda texts: detector.predict(texts)["toxicity"]
