"""`llmtrain sft --backend mlx` on the CPU (fp32): a tiny pretrained torch model fine-tuned on the
bundled dolly-sample; the response-only loss, the held-out loss going down, the HF export read by
torch with the same logits, the torch SFT's loss on the same batch, exact resume after SIGTERM."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from llmtrain.mlx.blas import preload_openblas

preload_openblas()  # effective when this module is the first to import mlx.core (see blas.py)
mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

from llmtrain.mlx.sft import MLXSFTTrainer, response_loss, to_mx_batch  # noqa: E402
from llmtrain.training.posttrain_config import SFTConfig, load_posttrain_config  # noqa: E402

TINY = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny torch Retention LLM saved as an HF dir with its tokenizer (a pretraining run's hf/)."""
    from llmtrain.data.tokenizer import load_tokenizer
    from llmtrain.models import build_model, create_model_config

    path = tmp_path_factory.mktemp("base") / "hf"
    tok = load_tokenizer()
    torch.manual_seed(0)
    model = build_model(create_model_config("tiny", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                            eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, **TINY))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


OPTIONS = dict(dataset="dolly-sample", device="cpu", dtype="fp32", max_length=96, skip_invalid=True, batch_size=4,
               max_steps=8, learning_rate=3e-3, warmup_steps=1, eval_interval=4, save_interval=4, log_interval=1,
               eval_fraction=0.1, progress=False)


def config(run_dir, base, **overrides):
    values = dict(OPTIONS, model_path=str(base), output_dir=str(run_dir), backend="mlx")
    values.update(overrides)
    return load_posttrain_config(SFTConfig, None, values)


def logged(run_dir, key="loss"):
    records = map(json.loads, open(os.path.join(run_dir, "metrics.jsonl")))
    return [(r["step"], r[key]) for r in records if key in r]


def test_cli_sft_backend_mlx_learns_and_exports_what_torch_reads(tmp_path, base_model, capsys):
    from transformers import AutoModelForCausalLM

    from llmtrain.cli import main
    from llmtrain.mlx.models import load_pretrained

    before = MLXSFTTrainer(config(tmp_path / "probe", base_model)).evaluate()["loss"]
    run = tmp_path / "run"
    argv = ["sft", "--backend", "mlx", "--model_path", str(base_model), "--output_dir", str(run)]
    for key, value in OPTIONS.items():
        argv += [f"--{key}", str(value)]
    assert main(argv) == 0
    assert "on MLX cpu" in capsys.readouterr().out
    val = logged(run, "val_loss")
    assert [s for s, _ in val] == [4, 8]
    assert val[-1][1] < before - 0.3, (before, val)  # the held-out response loss goes down
    assert [s for s, _ in logged(run)] == list(range(1, 9))
    assert (run / "latest.txt").read_text().strip() == "checkpoint_epoch0_step8"
    meta = json.loads((run / "checkpoint_epoch0_step8_meta.json").read_text())
    assert meta["method"] == "sft" and meta["framework"] == "mlx"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (run / "hf" / name).exists(), name

    # the export loads in torch with the MLX model's logits (and the checkpoint is the same model)
    ids = np.random.default_rng(0).integers(0, 200, (2, 20))
    mlx_logits = np.array(load_pretrained(run / "hf")(mx.array(ids)))
    np.testing.assert_allclose(np.array(load_pretrained(run)(mx.array(ids))), mlx_logits, rtol=0, atol=0)
    exported = AutoModelForCausalLM.from_pretrained(run / "hf").eval()
    with torch.no_grad():
        np.testing.assert_allclose(exported(torch.tensor(ids)).logits.numpy(), mlx_logits, rtol=1e-4, atol=1e-4)


def test_loss_is_on_responses_only_and_matches_the_torch_sft(tmp_path, base_model):
    from transformers import AutoModelForCausalLM

    from llmtrain.training.posttrain_loop import model_inputs
    from llmtrain.training.sft import response_loss as torch_response_loss

    trainer = MLXSFTTrainer(config(tmp_path / "run", base_model))
    order = trainer.epoch_order(0)[:4]
    items = [trainer.train_items[i] for i in order]
    batch = trainer.micro_batch(0, 0)
    mb = to_mx_batch(batch)
    loss = response_loss(trainer.model, mb).item()

    # manual: cross entropy at the positions whose next token the example's loss_mask marks
    logits = np.array(trainer.model(mb["input_ids"], attention_mask=mb["attention_mask"]), dtype=np.float64)
    terms, prompt_positions = [], 0
    for row, item in enumerate(items):
        ids, mask = list(item["input_ids"]), list(item["loss_mask"])
        for t in range(len(ids) - 1):
            if mask[t + 1]:
                z = logits[row, t]
                terms.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[ids[t + 1]])
            else:
                prompt_positions += 1
    assert prompt_positions > 0 and len(terms) == int((batch["labels"] != -100).sum())
    assert abs(loss - np.mean(terms)) < 1e-4

    # the torch SFT's loss of the same batch with the same weights
    torch_model = AutoModelForCausalLM.from_pretrained(base_model).eval()
    with torch.no_grad():
        expected = torch_response_loss(torch_model(**model_inputs(batch)).logits, batch["labels"]).item()
    assert abs(loss - expected) < 1e-4


def test_resume_after_sigterm_is_exact(tmp_path, base_model):
    full = MLXSFTTrainer(config(tmp_path / "full", base_model, max_steps=6, eval_interval=3, save_interval=3,
                                grad_accum=2)).train()
    assert full["step"] == 6

    def stop_at_2(trainer):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    part = tmp_path / "part"
    cfg = dict(max_steps=6, eval_interval=3, save_interval=3, grad_accum=2)
    summary = MLXSFTTrainer(config(part, base_model, **cfg), callbacks=[stop_at_2]).train()
    assert summary["interrupted"] and summary["step"] == 2
    assert (part / "latest.txt").read_text().strip() == "checkpoint_epoch0_step2"
    resumed = MLXSFTTrainer(config(part, base_model, resume="latest", **cfg))
    assert resumed.step == 2
    resumed.train()
    for key in ("loss", "grad_norm", "lr", "val_loss", "response_tokens"):
        assert logged(part, key) == logged(tmp_path / "full", key), key
