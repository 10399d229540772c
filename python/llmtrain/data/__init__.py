"""llmtrain.data: dataset catalog, tokenize-and-pack to `.bin` shards, memory-mapped loaders, mixtures,
SFT and preference formats, and the bundled offline corpus and tokenizer. See docs/data.md.

Names are imported on first use so that `import llmtrain.data` does not pull in torch, datasets or
transformers.
"""

from importlib import import_module

_EXPORTS = {
    "list_datasets": "catalog", "get_dataset": "catalog", "DatasetInfo": "catalog",
    "UnknownDatasetError": "catalog",
    "load_tokenizer": "tokenizer", "tokenizer_fingerprint": "tokenizer",
    "Shard": "shards", "ShardFormatError": "shards", "write_shard": "shards", "read_header": "shards",
    "prepare": "pipeline", "PrepareStats": "pipeline", "EmptyDatasetError": "pipeline",
    "DataSourceError": "sources",
    "PackedBinDataset": "loader", "StatefulLoader": "stream", "MixtureDataset": "mixture",
    "DataProcessor": "processor",
    "to_messages": "formats", "to_preference": "formats", "encode_messages": "formats",
    "encode_preference": "formats", "oasst_conversations": "formats", "parse_hh_dialogue": "formats",
    "PaddingCollator": "formats", "PackingCollator": "formats", "PreferenceCollator": "formats",
    "IGNORE_INDEX": "formats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
