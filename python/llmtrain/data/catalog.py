"""Catalog of the public datasets llmtrain knows how to read, by training stage.

Sizes are as published by the dataset authors (tokens for pretraining corpora, examples otherwise) and
are given for orientation, not checked. `layout` says which reader in `formats.py` understands the rows;
`text_field` is the column holding raw text for pretraining corpora.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STAGES = ("pretraining", "fine-tuning", "preference", "evaluation")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    hf_path: str
    stage: str
    domain: str
    size: str
    license: str
    layout: str  # "text", "alpaca", "dolly", "oasst", "flan", "hh-rlhf", "ultrafeedback", "rewardbench"
    text_field: str = "text"
    config: str | None = None
    split: str = "train"
    notes: str = ""
    aliases: tuple[str, ...] = field(default=())


DATASETS: tuple[DatasetInfo, ...] = (
    # Pretraining corpora: read by `prepare` (streaming from the Hub).
    DatasetInfo("fineweb-edu", "HuggingFaceFW/fineweb-edu", "pretraining", "educational web pages",
                "1.3T tokens", "ODC-By 1.0", "text", config="sample-10BT",
                notes="config 'sample-10BT' (10B-token sample); use 'default' for the full 1.3T tokens",
                aliases=("fineweb_edu",)),
    DatasetInfo("dolma", "allenai/dolma", "pretraining",
                "web, academic papers, code, books, encyclopedic, social media", "3T tokens (v1.6)",
                "ODC-By 1.0", "text",
                notes="large; pass local jsonl.gz files of the Dolma release to `prepare` if the Hub "
                      "loader is unavailable in your datasets version"),
    DatasetInfo("the-stack-v2", "bigcode/the-stack-v2", "pretraining", "source code (600+ languages)",
                "~900B tokens (train-full)", "various permissive source licences; gated, terms of use",
                "text", text_field="content",
                notes="gated: accept the terms on the Hub; rows reference Software Heritage blob ids, the "
                      "file contents must be fetched separately",
                aliases=("stack-v2", "the_stack_v2")),
    DatasetInfo("proof-pile-2", "EleutherAI/proof-pile-2", "pretraining",
                "mathematics (arXiv, OpenWebMath, AlgebraicStack)", "55B tokens",
                "per-subset source licences (see the dataset card)", "text", config="default",
                aliases=("proof_pile_2",)),
    # Supervised fine-tuning (instruction following).
    DatasetInfo("alpaca", "tatsu-lab/alpaca", "fine-tuning", "instruction following (self-instruct)",
                "52,002 examples", "CC BY-NC 4.0 (non-commercial)", "alpaca"),
    DatasetInfo("dolly-15k", "databricks/databricks-dolly-15k", "fine-tuning",
                "instruction following, human-written", "15,011 examples", "CC BY-SA 3.0", "dolly",
                aliases=("dolly",)),
    DatasetInfo("openassistant", "OpenAssistant/oasst1", "fine-tuning",
                "multi-turn multilingual assistant conversations",
                "161,443 messages in 10,364 conversation trees", "Apache-2.0", "oasst",
                notes="rows are messages of conversation trees; formats.oasst_conversations() rebuilds "
                      "the threads", aliases=("oasst1", "oasst")),
    DatasetInfo("flan-v2", "Open-Orca/FLAN", "fine-tuning", "templated NLP tasks (FLAN Collection 2022)",
                "~300M examples (1,800+ tasks)", "CC BY 4.0", "flan", aliases=("flan",)),
    # Preferences (reward modelling, DPO) and evaluation.
    DatasetInfo("hh-rlhf", "Anthropic/hh-rlhf", "preference", "helpful and harmless dialogue pairs",
                "169,352 pairs (160,800 train + 8,552 test)", "MIT", "hh-rlhf", aliases=("hh",)),
    DatasetInfo("ultrafeedback", "HuggingFaceH4/ultrafeedback_binarized", "preference",
                "GPT-4-rated responses, binarized to chosen/rejected", "61,135 train pairs + 2,000 test",
                "MIT", "ultrafeedback", split="train_prefs", aliases=("ultrafeedback-binarized",)),
    DatasetInfo("rewardbench", "allenai/reward-bench", "evaluation",
                "reward-model benchmark: chat, chat-hard, safety, reasoning", "2,985 pairs",
                "ODC-By 1.0 (prompts keep their source licences)", "rewardbench", split="filtered",
                aliases=("reward-bench",)),
)

class UnknownDatasetError(KeyError):
    """Raised for a name that is neither catalogued nor bundled; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


_BY_NAME = {name: info for info in DATASETS for name in (info.name, *info.aliases)}


def list_datasets(stage: str | None = None) -> list[DatasetInfo]:
    """All catalogued datasets, or those of one stage ("pretraining", "fine-tuning", "preference",
    "evaluation")."""
    if stage is None:
        return list(DATASETS)
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return [info for info in DATASETS if info.stage == stage]


def get_dataset(name: str) -> DatasetInfo:
    """Look a dataset up by name or alias (case-insensitive)."""
    key = name.strip().lower()
    if key in _BY_NAME:
        return _BY_NAME[key]
    known = ", ".join(info.name for info in DATASETS)
    raise UnknownDatasetError(f"unknown dataset {name!r}; known datasets: {known}")
