import gzip
import json

import pytest

from llmtrain.data import assets


@pytest.fixture(scope="session")
def tokenizer():
    from llmtrain.data import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def corpus_texts():
    """The first 120 documents of the bundled Shakespeare corpus: real text, quick to tokenize."""
    with gzip.open(assets.bundled_path("shakespeare"), "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(120), f)]


@pytest.fixture
def corpus_file(tmp_path, corpus_texts):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts))
    return path


@pytest.fixture
def prepared(tmp_path, corpus_file, tokenizer):
    """Shards of the corpus sample in tmp_path/out/shards/pretrain, small shards so there are several."""
    from llmtrain.data import prepare

    out = tmp_path / "out"
    stats = prepare(corpus_file, out, tokenizer=tokenizer, shard_tokens=40_000, val_fraction=0.1,
                    progress=False)
    return out / "shards" / "pretrain", stats
