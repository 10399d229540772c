"""The packed token shard format (`.bin`), its atomic writer and its validating reader.

Layout, little-endian (version 1):

    offset  size  field
         0     8  magic b"LLMTSHRD"
         8     4  format version (uint32) = 1
        12     4  bytes per token (uint32): 2 (uint16) if vocab_size <= 65536, else 4 (uint32)
        16     8  vocab size (uint64); every token id is < vocab size
        24     8  token count T (uint64)
        32     8  document count D (uint64)
        40    16  tokenizer fingerprint (blake2b-128 of the serialized tokenizer)
        56     8  reserved, zero
        64        T tokens, then zero padding to a multiple of 8 bytes
         .        D + 1 document start offsets (uint64): 0 = o_0 < o_1 < ... < o_D = T

Documents are stored back to back, each ending with EOS, and never span two shards, so the offsets let a
loader build position ids or block-diagonal masks that stop attention at document boundaries.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"LLMTSHRD"
FORMAT_VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQQQ16s8x")
assert _HEADER.size == HEADER_BYTES
_SCAN_CHUNK = 1 << 24  # tokens per chunk when checking ids against the vocabulary


class ShardFormatError(ValueError):
    """A shard file is malformed; the message names the file and what is wrong with it."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of the vocabulary."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    if vocab_size <= 1 << 32:
        return np.dtype("<u4")
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def _padded(nbytes: int) -> int:
    return (nbytes + 7) // 8 * 8


def _layout(token_bytes: int, num_tokens: int, num_docs: int) -> tuple[int, int]:
    """(byte offset of the document offsets, total file size)."""
    offsets_at = HEADER_BYTES + _padded(num_tokens * token_bytes)
    return offsets_at, offsets_at + 8 * (num_docs + 1)


@dataclass(frozen=True)
class ShardHeader:
    vocab_size: int
    num_tokens: int
    num_docs: int
    fingerprint: bytes
    version: int = FORMAT_VERSION

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)


def write_shard(path: str | os.PathLike, tokens: np.ndarray, doc_offsets: np.ndarray, vocab_size: int,
                fingerprint: bytes) -> ShardHeader:
    """Write one shard atomically: the bytes go to a temporary name in the same directory and replace
    `path` only once complete and flushed, so a crash never leaves a half-written shard behind."""
    path = Path(path)
    tokens = np.asarray(tokens)
    doc_offsets = np.asarray(doc_offsets, dtype=np.int64)
    dtype = token_dtype(vocab_size)
    if len(fingerprint) != 16:
        raise ValueError(f"tokenizer fingerprint must be 16 bytes, got {len(fingerprint)}")
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size:
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"{path}: token id {bad} is outside the vocabulary [0, {vocab_size})")
    _check_offsets(doc_offsets, tokens.size, where=str(path))

    header = ShardHeader(vocab_size, int(tokens.size), int(doc_offsets.size - 1), bytes(fingerprint))
    token_bytes = tokens.astype(dtype, copy=False).tobytes()
    padding = b"\0" * (_padded(len(token_bytes)) - len(token_bytes))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, FORMAT_VERSION, dtype.itemsize, vocab_size, header.num_tokens,
                                 header.num_docs, header.fingerprint))
            f.write(token_bytes)
            f.write(padding)
            f.write(doc_offsets.astype("<u8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return header


def _check_offsets(offsets: np.ndarray, num_tokens: int, where: str) -> None:
    if offsets.ndim != 1 or offsets.size < 1:
        raise ShardFormatError(f"{where}: document offsets must be a non-empty 1-D array")
    if offsets[0] != 0 or offsets[-1] != num_tokens:
        raise ShardFormatError(f"{where}: document offsets must start at 0 and end at the token count "
                               f"{num_tokens}, got {int(offsets[0])}..{int(offsets[-1])}")
    if offsets.size > 1 and not np.all(offsets[1:] > offsets[:-1]):
        raise ShardFormatError(f"{where}: document offsets are not strictly increasing (empty or "
                               f"reordered documents)")


class Shard:
    """A validated, memory-mapped shard. The memmaps are opened lazily and dropped when pickled, so a
    Shard can be sent to DataLoader worker processes without copying its tokens."""

    def __init__(self, path: str | os.PathLike, check_tokens: bool = True):
        self.path = Path(path)
        self.header = read_header(self.path)
        self._tokens: np.ndarray | None = None
        self._offsets: np.ndarray | None = None
        offsets = self.doc_offsets  # always validated: cheap, and the loader depends on it
        _check_offsets(offsets, self.header.num_tokens, where=str(self.path))
        if check_tokens:
            self._check_token_ids()

    @property
    def num_tokens(self) -> int:
        return self.header.num_tokens

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            h = self.header
            if h.num_tokens == 0:
                self._tokens = np.zeros(0, dtype=h.dtype)
            else:
                self._tokens = np.memmap(self.path, dtype=h.dtype, mode="r", offset=HEADER_BYTES,
                                         shape=(h.num_tokens,))
        return self._tokens

    @property
    def doc_offsets(self) -> np.ndarray:
        if self._offsets is None:
            h = self.header
            offsets_at, _ = _layout(h.dtype.itemsize, h.num_tokens, h.num_docs)
            self._offsets = np.memmap(self.path, dtype="<u8", mode="r", offset=offsets_at,
                                      shape=(h.num_docs + 1,)).astype(np.int64)
        return self._offsets

    def documents(self):
        """Yield each document's tokens (including its trailing EOS)."""
        offsets = self.doc_offsets
        for start, end in zip(offsets[:-1], offsets[1:]):
            yield self.tokens[start:end]

    def _check_token_ids(self) -> None:
        tokens, vocab = self.tokens, self.header.vocab_size
        for start in range(0, tokens.size, _SCAN_CHUNK):
            chunk = tokens[start:start + _SCAN_CHUNK]
            if chunk.size and int(chunk.max()) >= vocab:
                where = start + int(np.argmax(chunk >= vocab))
                raise ShardFormatError(f"{self.path}: token id {int(tokens[where])} at position {where} is "
                                       f">= the vocabulary size {vocab}")

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_tokens"] = None
        return state

    def __repr__(self) -> str:
        h = self.header
        return (f"Shard({str(self.path)!r}, tokens={h.num_tokens}, docs={h.num_docs}, vocab={h.vocab_size}, "
                f"dtype={h.dtype.name})")


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Parse and check a shard's header and size; raises ShardFormatError naming the file and problem."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
            file_size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise ShardFormatError(f"{path}: cannot read shard: {e.strerror or e}") from e
    if len(raw) < HEADER_BYTES:
        raise ShardFormatError(f"{path}: truncated shard: {file_size} bytes is shorter than the "
                               f"{HEADER_BYTES}-byte header")
    magic, version, token_bytes, vocab_size, num_tokens, num_docs, fingerprint = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise ShardFormatError(f"{path}: not an llmtrain shard (bad magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise ShardFormatError(f"{path}: unsupported shard format version {version} (this llmtrain reads "
                               f"version {FORMAT_VERSION})")
    try:
        expected_bytes = token_dtype(vocab_size).itemsize
    except ValueError as e:
        raise ShardFormatError(f"{path}: bad vocab size in header: {e}") from None
    if token_bytes != expected_bytes:
        raise ShardFormatError(f"{path}: header says {token_bytes} bytes per token but vocab size "
                               f"{vocab_size} needs {expected_bytes}")
    _, expected_size = _layout(token_bytes, num_tokens, num_docs)
    if file_size != expected_size:
        problem = "truncated shard" if file_size < expected_size else "trailing bytes after shard data"
        raise ShardFormatError(f"{path}: {problem}: header promises {num_tokens} tokens and {num_docs} "
                               f"documents ({expected_size} bytes) but the file has {file_size} bytes")
    return ShardHeader(vocab_size, num_tokens, num_docs, fingerprint, version)


def list_shards(directory: str | os.PathLike) -> list[Path]:
    """The `.bin` shards of a directory in name order (temporary files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"shard directory {directory} does not exist")
    return sorted(p for p in directory.glob("*.bin") if not p.name.startswith("."))
