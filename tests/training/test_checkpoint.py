"""Checkpoints: layout, atomicity, retention of the last K, exact optimizer/RNG restore, clear errors."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llmtrain.training import checkpoint as C
from llmtrain.training.utils import CheckpointError, load_checkpoint


def make(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    for _ in range(2):
        model(torch.randn(4, 6)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_layout_latest_and_keep_last(tmp_path):
    model, opt = make()
    for step in (10, 20, 30, 40):
        C.save_checkpoint(tmp_path, model=model, optimizer=opt, step=step, epoch=1, meta={"data": {}}, keep_last=2)
    names = sorted(os.listdir(tmp_path))
    assert names == ["checkpoint_epoch1_step30.safetensors", "checkpoint_epoch1_step30_meta.json",
                     "checkpoint_epoch1_step30_optim.safetensors", "checkpoint_epoch1_step40.safetensors",
                     "checkpoint_epoch1_step40_meta.json", "checkpoint_epoch1_step40_optim.safetensors",
                     "latest.txt"]
    assert (tmp_path / "latest.txt").read_text().strip() == "checkpoint_epoch1_step40"


def test_exact_restore(tmp_path):
    model, opt = make(0)
    C.save_checkpoint(tmp_path, model=model, optimizer=opt, step=7, epoch=0, meta={"data": {"pos": 3}})
    expected_next = torch.rand(3)  # RNG draws after the save...
    model2, opt2 = make(1)
    meta = load_checkpoint(model2, tmp_path, "latest", optimizer=opt2, restore_rng=True)
    assert torch.equal(torch.rand(3), expected_next)  # ...are replayed after the restore
    assert meta["step"] == 7 and meta["data"] == {"pos": 3}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    # identical next optimizer step
    x = torch.randn(4, 6)
    for m, o in ((model, opt), (model2, opt2)):
        m(x).square().sum().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_tied_weights_round_trip(tmp_path):
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    C.save_checkpoint(tmp_path, model=model, optimizer=None, step=1, epoch=0, meta={})
    emb2, head2 = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
    head2.weight = emb2.weight
    model2 = torch.nn.ModuleDict({"emb": emb2, "head": head2})
    load_checkpoint(model2, tmp_path)
    assert torch.equal(model2["head"].weight, emb.weight)


def test_errors_are_clear(tmp_path):
    model, opt = make()
    with pytest.raises(CheckpointError, match="no latest.txt"):
        load_checkpoint(model, tmp_path)
    stem = C.save_checkpoint(tmp_path, model=model, optimizer=opt, step=1, epoch=0, meta={})
    other = torch.nn.Linear(6, 2)
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_checkpoint(other, tmp_path)
    with open(f"{stem}.safetensors", "r+b") as f:
        f.truncate(40)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(model, tmp_path)
    meta_path = tmp_path / f"{stem.name}_meta.json"
    meta_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        load_checkpoint(model, tmp_path)
    meta_path.write_text(json.dumps({"format_version": 99}))
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(model, tmp_path)


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    """SIGKILL a process in the middle of writing: latest still names a complete, loadable checkpoint."""
    model, opt = make()
    C.save_checkpoint(tmp_path, model=model, optimizer=opt, step=1, epoch=0, meta={})
    script = textwrap.dedent(f"""
        import os, signal, torch
        from safetensors import torch as st
        from llmtrain.training import checkpoint as C
        real = st.save_file
        def dying_save(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)   # the temp file is written...
            os.kill(os.getpid(), signal.SIGKILL)       # ...and the process dies before the rename
        C.save_file = dying_save
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
        C.save_checkpoint({str(tmp_path)!r}, model=model, optimizer=None, step=2, epoch=0, meta={{}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert (tmp_path / "latest.txt").read_text().strip() == "checkpoint_epoch0_step1"
    meta = load_checkpoint(make(3)[0], tmp_path)
    assert meta["step"] == 1
    assert not (tmp_path / "checkpoint_epoch0_step2.safetensors").exists()


def test_end_of_step_checkpoints_when_due_and_on_a_signal(capsys):
    """The step boundary shared by the torch, post-training, PPO and MLX loops."""
    import types

    from llmtrain.training.trainer import _StopFlag, end_of_step

    saves, seen = [], []
    t = types.SimpleNamespace(step=0, total_steps=7, cfg=types.SimpleNamespace(save_interval=3), is_main=True,
                              callbacks=[lambda tr: seen.append(tr.step)])
    t.save = lambda: saves.append(t.step)
    stop = _StopFlag()
    for step in range(1, 8):
        t.step = step
        assert end_of_step(t, stop) is False
    assert saves == [3, 6, 7] and seen == list(range(1, 8))
    stop.signal, t.step = 15, 8
    assert end_of_step(t, stop) is True
    assert saves[-1] == 8 and "signal 15: saved a checkpoint at step 8" in capsys.readouterr().out
    t.is_main = False  # other ranks save (collectively) but stay quiet
    assert end_of_step(t, stop) is True and capsys.readouterr().out == ""
