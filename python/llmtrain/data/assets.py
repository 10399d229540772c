"""Paths of the data shipped inside the package (see assets/README.md for sources and licences)."""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"

# Names under which the bundled files can be used wherever a dataset name is accepted.
BUNDLED = {
    "shakespeare": ASSETS_DIR / "corpus" / "shakespeare.jsonl.gz",
    "dolly-sample": ASSETS_DIR / "sft" / "dolly_style.jsonl",
    "chat-sample": ASSETS_DIR / "sft" / "chat_messages.jsonl",
    "hh-rlhf-sample": ASSETS_DIR / "preference" / "hh_rlhf_style.jsonl",
    "ultrafeedback-sample": ASSETS_DIR / "preference" / "ultrafeedback_style.jsonl",
}


def tokenizer_file() -> Path:
    return ASSETS_DIR / "tokenizer" / "tokenizer.json"


def bundled_path(name: str) -> Path:
    try:
        path = BUNDLED[name]
    except KeyError:
        raise KeyError(f"no bundled dataset {name!r}; bundled: {sorted(BUNDLED)}") from None
    if not path.exists():
        raise FileNotFoundError(f"bundled data file {path} is missing from the installation")
    return path
