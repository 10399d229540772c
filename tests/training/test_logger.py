"""TrainingLogger writes JSONL (and a plot) holding exactly the logged values."""

import json
import math

from llmtrain.training.utils import TrainingLogger, compute_perplexity


def test_log_summary_plot(tmp_path):
    logger = TrainingLogger(tmp_path, tensorboard=False)
    for step, loss in enumerate([4.0, 3.0, 2.5], start=1):
        logger.log(step, {"loss": loss, "lr": 1e-3})
    logger.log(3, {"val_loss": 2.7})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in lines] == [4.0, 3.0, 2.5, None]
    summary = logger.get_summary()
    assert summary["loss"] == {"first": 4.0, "last": 2.5, "min": 2.5, "max": 4.0}
    assert math.isclose(summary["best_val_perplexity"], math.exp(2.7))
    png = logger.plot()
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logger.close()


def test_resume_truncates_replayed_steps(tmp_path):
    logger = TrainingLogger(tmp_path, tensorboard=False)
    for step in range(1, 6):
        logger.log(step, {"loss": float(step)})
    logger.close()
    again = TrainingLogger(tmp_path, tensorboard=False, append=True)
    again.truncate_after(3)
    again.log(4, {"loss": 40.0})
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    again.close()


def test_perplexity():
    assert compute_perplexity(0.0) == 1.0
    assert compute_perplexity(1e6) == float("inf")
