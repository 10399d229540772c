"""Where rows come from: bundled files, catalogued Hub datasets, arbitrary Hub repos, or local files.

Everything goes through Hugging Face `datasets` in streaming mode, so a corpus never has to fit in memory
or in the Arrow cache. Local files are streamed one at a time so that a parse error can name its file.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmtrain.data import assets
from llmtrain.data.catalog import DATASETS, DatasetInfo, UnknownDatasetError, get_dataset

# Extension -> `datasets` builder. Compressed variants (.gz, .zst, ...) are handled by `datasets`.
_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
             ".parquet": "parquet"}
_COMPRESSION = {".gz", ".bz2", ".xz", ".zst", ".lz4"}


class DataSourceError(RuntimeError):
    """A source could not be read; the message names the file or dataset and the cause."""


@dataclass(frozen=True)
class Source:
    """A resolved source: either local files or one Hub dataset."""
    spec: str
    files: tuple[Path, ...] = ()
    hub_path: str | None = None
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    layout: str = "text"
    info: DatasetInfo | None = None

    @property
    def is_local(self) -> bool:
        return bool(self.files)


def resolve_source(spec: str | os.PathLike, split: str | None = None, text_field: str | None = None) -> Source:
    """Turn a name or path into a Source. Order: bundled name, catalog name, existing local path or glob,
    then `owner/name` Hub repo. Anything else is an unknown dataset, reported with the known names."""
    spec = str(spec)
    if spec in assets.BUNDLED:
        path = assets.bundled_path(spec)
        layout = {"shakespeare": "text", "dolly-sample": "dolly", "chat-sample": "messages",
                  "hh-rlhf-sample": "hh-rlhf", "ultrafeedback-sample": "ultrafeedback"}[spec]
        return Source(spec, files=(path,), text_field=text_field or "text", layout=layout)
    try:
        info = get_dataset(spec)
    except UnknownDatasetError:
        info = None
    if info is not None:
        return Source(spec, hub_path=info.hf_path, config=info.config, split=split or info.split,
                      text_field=text_field or info.text_field, layout=info.layout, info=info)
    files = _local_files(spec)
    if files:
        return Source(spec, files=files, split="train", text_field=text_field or "text", layout="text")
    if _looks_like_path(spec):
        raise DataSourceError(f"no such file or directory: {spec}")
    if spec.count("/") == 1 and not spec.startswith("/"):
        return Source(spec, hub_path=spec, split=split or "train", text_field=text_field or "text")
    known = ", ".join([*assets.BUNDLED, *(d.name for d in DATASETS)])
    raise UnknownDatasetError(f"unknown dataset {spec!r}: not a bundled or catalogued name, an existing "
                              f"file, or an owner/name Hub repo; known datasets: {known}")


def _looks_like_path(spec: str) -> bool:
    suffixes = Path(spec).suffixes
    return spec.startswith((".", "/", "~")) or any(s in _BUILDERS or s in _COMPRESSION for s in suffixes)


def _local_files(spec: str) -> tuple[Path, ...]:
    path = Path(spec).expanduser()
    if path.is_dir():
        candidates = sorted(p for p in path.rglob("*") if p.is_file() and _builder_for(p, strict=False))
        if not candidates:
            raise DataSourceError(f"directory {path} holds no .txt, .jsonl, .json or .parquet files")
        return tuple(candidates)
    if path.exists():
        return (path,)
    matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec)) if Path(p).is_file())
    return tuple(matches)


def _builder_for(path: Path, strict: bool = True) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION:
        suffixes.pop()
    builder = _BUILDERS.get(suffixes[-1]) if suffixes else None
    if builder is None and strict:
        raise DataSourceError(f"{path}: unsupported file type; expected .txt, .jsonl, .json or .parquet "
                              f"(optionally compressed)")
    return builder


def iter_rows(source: Source, limit: int | None = None, txt_sample_by: str = "paragraph") -> Iterator[dict]:
    """Stream rows (dicts) from a source, at most `limit` of them."""
    count = 0
    for rows, where in _row_streams(source, txt_sample_by):
        try:
            for row in rows:
                if limit is not None and count >= limit:
                    return
                count += 1
                yield row
        except (DataSourceError, UnknownDatasetError):
            raise
        except Exception as e:  # datasets raises many types (ArrowInvalid, JSONDecodeError, ...)
            raise DataSourceError(f"cannot read {where}: {type(e).__name__}: {e}") from e


def iter_texts(source: Source, limit: int | None = None, txt_sample_by: str = "paragraph") -> Iterator[str]:
    """Stream the raw text of each document, checking that the text column exists."""
    field = source.text_field
    for row in iter_rows(source, limit, txt_sample_by):
        if field not in row:
            raise DataSourceError(f"{source.spec}: rows have no {field!r} column (columns: {sorted(row)}); "
                                  f"pass text_field=... / --text-field")
        text = row[field]
        if not isinstance(text, str):
            raise DataSourceError(f"{source.spec}: column {field!r} holds {type(text).__name__}, not text")
        yield text


def _row_streams(source: Source, txt_sample_by: str):
    from datasets import load_dataset

    if source.is_local:
        for path in source.files:
            builder = _builder_for(path)
            if not os.access(path, os.R_OK):
                raise DataSourceError(f"cannot read {path}: permission denied")
            kwargs = {"sample_by": txt_sample_by} if builder == "text" else {}
            try:
                rows = load_dataset(builder, data_files=[str(path)], split="train", streaming=True, **kwargs)
            except Exception as e:
                raise DataSourceError(f"cannot read {path}: {type(e).__name__}: {e}") from e
            yield rows, path
    else:
        where = f"Hub dataset {source.hub_path}" + (f" ({source.config})" if source.config else "")
        try:
            rows = load_dataset(source.hub_path, source.config, split=source.split, streaming=True)
        except Exception as e:
            raise DataSourceError(f"cannot open {where}: {type(e).__name__}: {e}") from e
        yield rows, where
