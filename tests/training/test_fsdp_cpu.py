"""FSDP2 (`--fsdp true`, torch backend) on CPU: 2 gloo processes under torchrun. fully_shard runs on
gloo, so the sharding, the reduce-scatter, the gathered full-state checkpoints and their resume across
world sizes and backends are all checked here; only the bf16 mixed-precision policy needs a GPU to
matter (on CPU the run is fp32)."""

import json

import pytest
from safetensors.torch import load_file

from llmtrain.training.config import ConfigError, load_config
from tests.training.test_distributed_cpu import close, run


@pytest.mark.slow
def test_fsdp_matches_ddp_and_single_process_and_resumes_across_backends(tmp_path):
    # one global batch of 4 sequences throughout: 1 x 4 and 2 x 2. Four launches (imports dominate).
    fsdp = ("--fsdp", "true", "--activation_checkpointing", "true")
    single = run(tmp_path, 1, "single_to_fsdp", "--batch_size", "4", "--stop_at_step", "3")
    # FSDP2 on 2 processes: steps 1-3 match the plain process; saved at step 3, resumed by DDP
    part = run(tmp_path, 2, "fsdp_to_ddp", "--batch_size", "2", "--stop_at_step", "3", *fsdp)
    assert [s for s, _ in part] == [s for s, _ in single] == [1, 2, 3]
    for (s, a), (_, b) in zip(part, single):
        assert close(a, b), (s, a, b)
    ddp = run(tmp_path, 2, "fsdp_to_ddp", "--batch_size", "2", "--resume", "latest")[3:]
    # the plain process's checkpoint resumed by FSDP2 on 2 processes, run to the end (sample, export):
    # steps 4-6 match DDP's (which test_distributed_cpu checks against one uninterrupted process)
    resumed = run(tmp_path, 2, "single_to_fsdp", "--batch_size", "2", "--resume", "latest", *fsdp)[3:]
    assert [s for s, _ in resumed] == [s for s, _ in ddp] == [4, 5, 6]
    for (s, a), (_, b) in zip(resumed, ddp):
        assert close(a, b), (s, a, b)
    # the FSDP checkpoint is the plain format: same tensors, shapes, optimizer layout as DDP's
    # (so it resumes anywhere a single-process or DDP checkpoint does)
    def stem(out):
        return tmp_path / out / (tmp_path / out / "latest.txt").read_text().strip()

    ref_stem, got_stem = stem("fsdp_to_ddp"), stem("single_to_fsdp")
    ref_w, got_w = load_file(f"{ref_stem}.safetensors"), load_file(f"{got_stem}.safetensors")
    assert sorted(ref_w) == sorted(got_w)
    for name, t in ref_w.items():
        assert got_w[name].shape == t.shape and got_w[name].dtype == t.dtype, name
        assert (got_w[name] - t).abs().max() < 1e-3, name
    ref_o, got_o = load_file(f"{ref_stem}_optim.safetensors"), load_file(f"{got_stem}_optim.safetensors")
    assert sorted(ref_o) == sorted(got_o)
    for name, t in ref_o.items():
        if not name.startswith("rng."):
            assert got_o[name].shape == t.shape, name
    ref_meta = json.loads(open(f"{ref_stem}_meta.json").read())
    got_meta = json.loads(open(f"{got_stem}_meta.json").read())
    assert ref_meta["optimizer"] == got_meta["optimizer"]
    assert got_meta["world_size"] == 2 and got_meta["step"] == 6
    # the Hugging Face export after an FSDP run is the full model, equal to the DDP run's
    ref_hf = load_file(tmp_path / "fsdp_to_ddp/hf/model.safetensors")
    got_hf = load_file(tmp_path / "single_to_fsdp/hf/model.safetensors")
    assert sorted(ref_hf) == sorted(got_hf)
    for name, t in ref_hf.items():
        assert (got_hf[name] - t).abs().max() < 1e-3, name


def test_fsdp_needs_the_torch_backend():
    with pytest.raises(ConfigError, match="^fsdp:"):
        load_config(None, {"max_steps": 1, "fsdp": "true", "backend": "deepspeed"})
    with pytest.raises(ConfigError, match="^fsdp: expected bool"):
        load_config(None, {"max_steps": 1, "fsdp": "sometimes"})
    assert load_config(None, {"max_steps": 1, "fsdp": "true"}).fsdp is True
