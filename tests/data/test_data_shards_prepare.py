import json
import os

import numpy as np
import pytest

from llmtrain.data import (DataSourceError, EmptyDatasetError, PackedBinDataset, Shard, ShardFormatError,
                           UnknownDatasetError, prepare, read_header, write_shard)
from llmtrain.data.filters import MinHashDedup, ToxicityFilter
from llmtrain.data.shards import HEADER_BYTES, list_shards
from llmtrain.data.tokenizer import tokenizer_fingerprint

FP = bytes(range(16))


def _snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_round_trip_text_to_shards_to_loader_to_text(prepared, corpus_texts, tokenizer):
    phase_dir, stats = prepared
    meta = json.loads((phase_dir / "meta.json").read_text())
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer).hex()
    assert stats.shards["train"] > 1 and stats.docs_kept["val"] >= 1
    # Every kept document comes back byte-exact, each followed by EOS, in input order.
    docs = []
    for split in ("train", "val"):
        for path in list_shards(phase_dir / split):
            shard = Shard(path)
            for doc in shard.documents():
                assert doc[-1] == tokenizer.eos_token_id
                docs.append(tokenizer.decode(doc[:-1].tolist()))
    assert sorted(docs) == sorted(set(corpus_texts) & set(docs))
    assert len(docs) == sum(stats.docs_kept.values()) and len(docs) >= len(corpus_texts) - 5
    # The loader's windows are the shard tokens: unshuffled windows concatenated give the token stream.
    ds = PackedBinDataset(phase_dir / "train", seq_len=64, shuffle=False)
    first = Shard(list_shards(phase_dir / "train")[0])
    x, y = ds.sample(0)
    assert x.dtype.is_floating_point is False and str(x.dtype) == "torch.int64" and x.shape == (64,)
    assert x.tolist() == first.tokens[:64].tolist() and y.tolist() == first.tokens[1:65].tolist()
    assert docs[0] in corpus_texts and docs[0].startswith(tokenizer.decode(x.tolist()))


def test_uint32_tokens_for_large_vocabularies(tmp_path):
    tokens = np.array([0, 70_000, 99_999, 5], dtype=np.int64)
    write_shard(tmp_path / "a.bin", tokens, [0, 2, 4], vocab_size=100_000, fingerprint=FP)
    shard = Shard(tmp_path / "a.bin")
    assert shard.tokens.dtype == np.uint32 and shard.tokens.tolist() == tokens.tolist()
    assert shard.header.fingerprint == FP and shard.header.num_docs == 2


def test_truncated_shard_is_named_and_explained(tmp_path):
    path = tmp_path / "t.bin"
    write_shard(path, np.arange(100), [0, 50, 100], vocab_size=1000, fingerprint=FP)
    data = path.read_bytes()
    path.write_bytes(data[:-9])
    with pytest.raises(ShardFormatError, match=r"t\.bin: truncated shard: header promises 100 tokens"):
        Shard(path)
    path.write_bytes(data[:10])
    with pytest.raises(ShardFormatError, match=r"t\.bin: truncated shard: 10 bytes"):
        read_header(path)


def test_wrong_magic_and_version(tmp_path):
    path = tmp_path / "m.bin"
    write_shard(path, np.arange(10), [0, 10], vocab_size=1000, fingerprint=FP)
    data = bytearray(path.read_bytes())
    bad_magic = bytearray(data)
    bad_magic[:8] = b"NOTASHRD"
    path.write_bytes(bad_magic)
    with pytest.raises(ShardFormatError, match=r"m\.bin: not an llmtrain shard \(bad magic"):
        Shard(path)
    bad_version = bytearray(data)
    bad_version[8:12] = (7).to_bytes(4, "little")
    path.write_bytes(bad_version)
    with pytest.raises(ShardFormatError, match=r"m\.bin: unsupported shard format version 7"):
        Shard(path)


def test_token_id_outside_vocab_is_refused_on_write_and_read(tmp_path):
    with pytest.raises(ValueError, match=r"token id 1000 is outside the vocabulary \[0, 1000\)"):
        write_shard(tmp_path / "w.bin", np.array([1, 1000]), [0, 2], vocab_size=1000, fingerprint=FP)
    assert not list(tmp_path.iterdir())  # nothing, not even a temporary file, was left behind
    path = tmp_path / "r.bin"
    write_shard(path, np.array([1, 2, 3]), [0, 3], vocab_size=1000, fingerprint=FP)
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + 2:HEADER_BYTES + 4] = (4000).to_bytes(2, "little")  # corrupt token 1
    path.write_bytes(data)
    with pytest.raises(ShardFormatError, match=r"r\.bin: token id 4000 at position 1 is >= the vocabulary size 1000"):
        Shard(path)


def test_bad_document_offsets(tmp_path):
    with pytest.raises(ShardFormatError, match="strictly increasing"):
        write_shard(tmp_path / "o.bin", np.arange(10), [0, 5, 5, 10], vocab_size=100, fingerprint=FP)
    with pytest.raises(ShardFormatError, match="end at the token count 10"):
        write_shard(tmp_path / "o.bin", np.arange(10), [0, 9], vocab_size=100, fingerprint=FP)


def test_failed_prepare_leaves_existing_shards_untouched(prepared, tmp_path, tokenizer):
    phase_dir, _ = prepared
    out = phase_dir.parent.parent
    before = _snapshot(phase_dir)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "   "}) + "\n" + json.dumps({"text": "tiny"}) + "\n")
    with pytest.raises(EmptyDatasetError, match=r"empty\.jsonl: no documents to write \(read 2"):
        prepare(empty, out, tokenizer=tokenizer, progress=False)
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text(json.dumps({"text": "fine " * 50}) + "\n{this is not json\n")
    with pytest.raises(DataSourceError, match=r"cannot read .*corrupt\.jsonl"):
        prepare(corrupt, out, tokenizer=tokenizer, progress=False)
    wrong_column = tmp_path / "col.jsonl"
    wrong_column.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataSourceError, match=r"no 'text' column \(columns: \['body'\]\)"):
        prepare(wrong_column, out, tokenizer=tokenizer, progress=False)
    with pytest.raises(DataSourceError, match=r"no such file or directory: .*missing\.jsonl"):
        prepare(tmp_path / "missing.jsonl", out, tokenizer=tokenizer, progress=False)
    with pytest.raises(UnknownDatasetError, match="known datasets: .*fineweb-edu"):
        prepare("not-a-dataset", out, tokenizer=tokenizer, progress=False)
    assert _snapshot(phase_dir) == before
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["pretrain"]  # no staging left over


def test_unreadable_file_is_named(tmp_path, tokenizer):
    binary = tmp_path / "blob.parquet"
    binary.write_bytes(os.urandom(256))
    with pytest.raises(DataSourceError, match=r"cannot read .*blob\.parquet"):
        prepare(binary, tmp_path / "out", tokenizer=tokenizer, progress=False)
    with pytest.raises(DataSourceError, match=r"unsupported file type"):
        weird = tmp_path / "notes.docx"
        weird.write_bytes(b"PK")
        prepare(tmp_path / "notes.docx", tmp_path / "out", tokenizer=tokenizer, progress=False)


def test_successful_prepare_replaces_previous_output(prepared, tmp_path, tokenizer):
    phase_dir, _ = prepared
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(f"Paragraph {i}: " + "words " * (20 + i) for i in range(30)))
    stats = prepare(small, phase_dir.parent.parent, tokenizer=tokenizer, val_fraction=0.1, progress=False)
    assert stats.docs_kept == {"train": 27, "val": 3}
    assert len(list_shards(phase_dir / "train")) == 1
    assert json.loads((phase_dir / "meta.json").read_text())["docs_read"] == 30


def test_quality_filters(tmp_path, corpus_texts, tokenizer):
    base = corpus_texts[:20]
    near = base[3].replace("the", "thee", 1) + " Amen."
    texts = base + [base[0], base[1].upper(), near, "short"]
    path = tmp_path / "dups.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    stats = prepare(path, tmp_path / "out", tokenizer=tokenizer, val_fraction=0.0, progress=False)
    assert stats.dropped["exact_duplicate"] == 2  # verbatim copy and case-only change
    assert stats.dropped["near_duplicate"] == 1
    assert stats.dropped["length"] == 1
    assert stats.docs_kept["train"] == 20


def test_minhash_separates_similar_from_different(corpus_texts, tokenizer):
    dedup = MinHashDedup(threshold=0.8)
    a = tokenizer(corpus_texts[5])["input_ids"]
    assert dedup.keep(a)
    assert not dedup.keep(a[:5] + [42] + a[6:])  # one token changed
    assert dedup.keep(tokenizer(corpus_texts[6])["input_ids"])


def test_toxicity_filter_with_a_scorer(tmp_path, corpus_texts, tokenizer):
    scorer = lambda texts: [0.9 if "villain" in t else 0.1 for t in texts]  # noqa: E731
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[:30]))
    stats = prepare(path, tmp_path / "out", tokenizer=tokenizer, toxicity_threshold=0.5,
                    toxicity_scorer=scorer, progress=False)
    assert stats.dropped["toxic"] == sum("villain" in t for t in corpus_texts[:30]) > 0
    assert ToxicityFilter(0.5, scorer=scorer).keep_batch(["a villain", "a friend"]) == [False, True]
