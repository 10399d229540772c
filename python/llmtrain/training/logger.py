"""TrainingLogger: metrics to JSONL (always) and TensorBoard (when installed), a summary, a loss plot."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


def compute_perplexity(loss: float) -> float:
    """exp(loss), saturating to inf instead of overflowing."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


class TrainingLogger:
    """log(step, metrics) appends one JSON line per call; get_summary() aggregates what was logged."""

    def __init__(self, log_dir: str | Path, *, tensorboard: bool = True, append: bool = False):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.log_dir / "metrics.jsonl"
        self.history: list[dict] = []
        if append and self.path.exists():
            self.history = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        else:
            self.path.write_text("")
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.log_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tb = None
        self._start = time.time()

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": int(step), "time": round(time.time() - self._start, 3)}
        record.update({k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()})
        self.history.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> None:
        """Drop records after `step` (a resumed run replays them)."""
        self.history = [r for r in self.history if r["step"] <= step]
        self._file.close()
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        self._file = open(self.path, "a")

    def get_summary(self) -> dict:
        summary: dict = {"num_records": len(self.history)}
        if not self.history:
            return summary
        summary["last_step"] = self.history[-1]["step"]
        keys = {k for r in self.history for k in r if k not in ("step", "time")}
        for k in sorted(keys):
            values = [r[k] for r in self.history if isinstance(r.get(k), (int, float))]
            if values:
                summary[k] = {"first": values[0], "last": values[-1], "min": min(values), "max": max(values)}
        if "val_loss" in summary:
            summary["best_val_perplexity"] = compute_perplexity(summary["val_loss"]["min"])
        return summary

    def plot(self, path: str | Path | None = None, keys=("loss", "val_loss")) -> Path | None:
        """A PNG of the loss curves (needs matplotlib; returns None without it)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        path = Path(path) if path else self.log_dir / "loss.png"
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            pts = [(r["step"], r[key]) for r in self.history if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="o" if key.startswith("val") else None)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
