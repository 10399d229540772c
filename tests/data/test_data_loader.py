import numpy as np
import pytest
import torch

from llmtrain.data import MixtureDataset, PackedBinDataset, write_shard

FP = bytes(16)


@pytest.fixture
def numbered_shards(tmp_path):
    """Three shards whose tokens are their global positions, so every window is identifiable by its
    first token. Documents of growing length let curriculum and document-id tests check real values."""
    start = 0
    for i, n in enumerate([1000, 1537, 700]):
        tokens = np.arange(start, start + n) % 60_000
        doc_lengths = np.minimum(np.arange(1, 200) * (3 + i), n)
        offsets = np.unique(np.concatenate([[0], np.cumsum(doc_lengths)[np.cumsum(doc_lengths) < n], [n]]))
        write_shard(tmp_path / f"train_{i:05d}.bin", tokens, offsets, vocab_size=60_000, fingerprint=FP)
        start += n
    return tmp_path


def first_tokens(batches):
    return [int(t) for x, _ in batches for t in (x[:, 0] if x.dim() == 2 else x[:1])]


def test_windows_are_input_target_pairs(numbered_shards):
    ds = PackedBinDataset(numbered_shards, seq_len=32, shuffle=False)
    assert ds.num_windows == 999 // 32 + 1536 // 32 + 699 // 32
    for x, y in ds:
        assert x.dtype == torch.int64 and x.shape == y.shape == (32,)
        assert torch.equal(x[1:], y[:-1]) and int(y[-1]) == int(x[-1]) + 1  # contiguous, never across shards


def test_deterministic_by_seed_and_epoch(numbered_shards):
    run = lambda seed: first_tokens(PackedBinDataset(numbered_shards, 32, batch_size=4, seed=seed))  # noqa: E731
    assert run(1) == run(1)
    assert run(1) != run(2)
    ds = PackedBinDataset(numbered_shards, 32, batch_size=4, seed=1)
    epoch0, epoch1 = first_tokens(ds), first_tokens(ds)  # a full pass advances the epoch
    assert ds.epoch == 2 and epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume_mid_epoch(numbered_shards, num_workers):
    reference = PackedBinDataset(numbered_shards, 32, batch_size=3, seed=7)
    expected = [b for _ in range(2) for b in reference]  # two epochs, no interruption
    ds = PackedBinDataset(numbered_shards, 32, batch_size=3, seed=7)
    loader = ds.loader(num_workers=num_workers)
    seen = []
    for i, batch in enumerate(loader):
        seen.append(batch)
        if i == 10:
            break
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["consumed"] == 11
    resumed = PackedBinDataset(numbered_shards, 32, batch_size=3, seed=7)
    resumed.load_state_dict(state)
    resumed_loader = resumed.loader(num_workers=num_workers)
    seen += list(resumed_loader)  # rest of epoch 0
    seen += list(resumed_loader)  # epoch 1
    assert len(seen) == len(expected)
    for (x, y), (ex, ey) in zip(seen, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_worker_count_does_not_change_the_stream(numbered_shards):
    single = list(PackedBinDataset(numbered_shards, 16, batch_size=5, seed=3).loader(num_workers=0))
    multi = list(PackedBinDataset(numbered_shards, 16, batch_size=5, seed=3).loader(num_workers=2))
    assert len(single) == len(multi) > 0
    assert all(torch.equal(a[0], b[0]) for a, b in zip(single, multi))


def test_resume_refuses_a_changed_configuration(numbered_shards):
    state = PackedBinDataset(numbered_shards, 32, batch_size=3).state_dict()
    with pytest.raises(ValueError, match=r"configuration changed \(batch_size: saved 3 vs now 4"):
        PackedBinDataset(numbered_shards, 32, batch_size=4).load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_rank_sharding_covers_each_window_once(numbered_shards, world_size):
    total = PackedBinDataset(numbered_shards, 32).num_windows
    per_rank = [first_tokens(PackedBinDataset(numbered_shards, 32, seed=5, rank=r, world_size=world_size,
                                              even_ranks=False)) for r in range(world_size)]
    every = [t for rank in per_rank for t in rank]
    assert len(every) == len(set(every)) == total
    even = [first_tokens(PackedBinDataset(numbered_shards, 32, seed=5, rank=r, world_size=world_size))
            for r in range(world_size)]
    assert len({len(r) for r in even}) == 1  # lockstep
    flat = [t for r in even for t in r]
    assert len(flat) == len(set(flat)) and total - len(flat) < world_size


def test_document_info(tmp_path):
    tokens = np.arange(20)
    write_shard(tmp_path / "d.bin", tokens, [0, 3, 10, 20], vocab_size=100, fingerprint=FP)
    ds = PackedBinDataset(tmp_path, seq_len=9, shuffle=False, return_doc_info=True, batch_size=2)
    batch = next(iter(ds))
    assert batch["input_ids"][0].tolist() == list(range(9))
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5]
    assert batch["document_ids"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert batch["position_ids"][1].tolist() == [6, 0, 1, 2, 3, 4, 5, 6, 7]
    assert batch["document_ids"][1].tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 1]


def test_short_first_curriculum(numbered_shards):
    ds = PackedBinDataset(numbered_shards, 32, seed=0, curriculum="short_first", return_doc_info=True)
    docs_per_window = [int(s["document_ids"].max()) + 1 for s in ds]  # epoch 0: curriculum order
    assert docs_per_window == sorted(docs_per_window, reverse=True) and docs_per_window[0] > docs_per_window[-1]
    later = [int(s["document_ids"].max()) + 1 for s in ds]  # epoch 1: plain shuffle
    assert later != docs_per_window and sorted(later) == sorted(docs_per_window)


def test_mixture_follows_weights_and_resumes(tmp_path, numbered_shards):
    other = tmp_path / "other"
    other.mkdir()
    write_shard(other / "o.bin", np.full(3000, 59_999), [0, 3000], vocab_size=60_000, fingerprint=FP)
    old, new = PackedBinDataset(numbered_shards, 32, seed=1), PackedBinDataset(other, 32, seed=1)
    mix = MixtureDataset([old, new], weights=[0.25, 0.75], seed=4, batch_size=8, num_samples=4000)
    batches = list(mix)
    from_new = sum(int((x[:, 0] == 59_999).sum()) for x, _ in batches)
    assert len(batches) == 500 and abs(from_new / 4000 - 0.75) < 0.03
    # Sources cycle through their own epochs: the old data is revisited with every window once per epoch.
    old_firsts = [int(t) for x, _ in batches for t in x[:, 0] if t != 59_999][: old.num_windows]
    assert sorted(old_firsts) == sorted(first_tokens(PackedBinDataset(numbered_shards, 32, seed=1)))
    resumed = MixtureDataset([old, new], weights=[0.25, 0.75], seed=4, batch_size=8, num_samples=4000)
    state = {"epoch": 0, "consumed": 123, "config": mix.state_dict()["config"]}
    resumed.load_state_dict(state)
    tail = list(resumed.loader(num_workers=2))
    assert len(tail) == 500 - 123 and all(torch.equal(a[0], b[0]) for a, b in zip(tail, batches[123:]))


def test_mixed_tokenizers_are_refused(tmp_path, numbered_shards):
    write_shard(numbered_shards / "train_00009.bin", np.arange(100), [0, 100], vocab_size=60_000,
                fingerprint=b"\x01" * 16)
    with pytest.raises(ValueError, match=r"train_00009\.bin: tokenizer .* differs from"):
        PackedBinDataset(numbered_shards, 32)
