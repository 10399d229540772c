"""pytest-benchmark: one optimizer step of `llmtrain bench train`'s path (Trainer on random tokens).

    pytest bench/test_bench_train.py --benchmark-enable            # CPU tiny case (+ GPU cases on CUDA)

The CPU case is a tiny model so CI can run it; the CUDA cases are the issue's 2K-context rows
(retention small and the compiled GPT-2 baseline). The full table with MFU and memory comes from
`llmtrain bench train` / bench/device_train.sh; here pytest-benchmark times whole steps.
"""

import pytest
import torch

from llmtrain.bench.train import BENCH_MODELS, RandomTokenData, _random_data, bench_baseline
from llmtrain.training.config import TrainConfig, apply


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _config(model: str, overrides: dict, seq_len: int, batch: int, device: str, out: str):
    size, preset = BENCH_MODELS.get(model, (model, {}))
    return apply(TrainConfig(), dict(model_size=size, model_overrides={**preset, **overrides}, seq_len=seq_len,
                                     batch_size=batch, max_steps=10**6, device=device, progress=False,
                                     eval_interval=10**9, save_interval=10**9, log_interval=10**9,
                                     output_dir=out), "bench").validate()


def _trainer_step(cfg):
    """A function running one Trainer optimizer step (the loop body of Trainer.train)."""
    from llmtrain.models import create_model_config
    from llmtrain.training.trainer import Trainer, lm_loss

    vocab = create_model_config(cfg.model_size, **cfg.model_overrides).vocab_size
    with _random_data(RandomTokenData(vocab, cfg.batch_size, cfg.seq_len, cfg.seed)):
        trainer = Trainer(cfg)
    batches = iter(trainer.data.train)

    def step():
        x, y = next(batches)
        with trainer._autocast():
            loss = lm_loss(trainer.forward, x.to(trainer.device), y.to(trainer.device))
        trainer.backend.backward(loss)
        trainer.backend.step()
        loss.item()
    return step


def test_train_step_cpu_tiny(benchmark, tmp_path):
    cfg = _config("tiny", {"num_hidden_layers": 2, "vocab_size": 512}, 64, 2, "cpu", str(tmp_path))
    benchmark.pedantic(_trainer_step(cfg), rounds=3, warmup_rounds=1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model", ["small", "retention-1b", "mla-1b"])
def test_train_step_cuda_2k(benchmark, tmp_path, model):
    cfg = _config(model, {}, 2048, 8, "cuda", str(tmp_path))
    benchmark.pedantic(_trainer_step(cfg), rounds=5, warmup_rounds=2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpt2_baseline_cuda_2k(benchmark, tmp_path):
    cfg = _config("small", {}, 2048, 8, "cuda", str(tmp_path))
    row = benchmark.pedantic(lambda: bench_baseline("gpt2", cfg, 2, 5, 989e12, True), rounds=1, iterations=1)
    benchmark.extra_info.update({k: row[k] for k in ("tokens_per_s", "mfu", "peak_mem_gib")})
