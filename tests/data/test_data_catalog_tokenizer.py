import pytest

from llmtrain.data import get_dataset, list_datasets, load_tokenizer
from llmtrain.data import UnknownDatasetError
from llmtrain.data.assets import ASSETS_DIR


def test_catalog_covers_the_documented_sources_by_stage():
    names = {d.name for d in list_datasets()}
    assert {"fineweb-edu", "dolma", "the-stack-v2", "proof-pile-2", "alpaca", "dolly-15k", "openassistant",
            "flan-v2", "hh-rlhf", "ultrafeedback", "rewardbench"} <= names
    assert {d.name for d in list_datasets("pretraining")} == {"fineweb-edu", "dolma", "the-stack-v2", "proof-pile-2"}
    assert {d.name for d in list_datasets("preference")} == {"hh-rlhf", "ultrafeedback"}
    for info in list_datasets():
        assert info.hf_path.count("/") == 1 and info.size and info.license and info.domain


def test_get_dataset_by_name_and_alias():
    assert get_dataset("Dolly").hf_path == "databricks/databricks-dolly-15k"
    assert get_dataset("hh-rlhf").license == "MIT"


def test_unknown_dataset_lists_known_names():
    with pytest.raises(UnknownDatasetError) as err:
        get_dataset("wikitext-9000")
    message = str(err.value)
    assert "wikitext-9000" in message and "fineweb-edu" in message and "ultrafeedback" in message
    with pytest.raises(ValueError, match="stages"):
        list_datasets("pretrain")


def test_bundled_tokenizer_is_offline_and_complete(tokenizer):
    assert type(tokenizer).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend") and tokenizer.is_fast
    assert len(tokenizer) == 8192
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.bos_token_id is not None and tokenizer.chat_template
    text = "To be, or not to be, that is the question."
    ids = tokenizer(text)["input_ids"]
    assert len(ids) < len(text) / 2  # a trained BPE compresses English text
    assert tokenizer.decode(ids) == text


def test_load_tokenizer_from_a_tokenizer_json_path():
    tok = load_tokenizer(ASSETS_DIR / "tokenizer" / "tokenizer.json")
    assert tok.eos_token is not None and tok.pad_token is not None and tok.chat_template


def test_shipped_data_stays_small():
    total = sum(p.stat().st_size for p in ASSETS_DIR.rglob("*") if p.is_file() and p.suffix != ".pyc")
    assert total <= 6 * 1024 * 1024
