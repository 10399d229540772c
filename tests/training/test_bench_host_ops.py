"""bench/host_ops.py: operators dispatched per training step (the host's share of a step)."""

import pytest
import torch

from tests.conftest import load_bench_script


@pytest.fixture(scope="module")
def host_ops():
    return load_bench_script("host_ops")


def test_counts_one_step_and_no_warmup(host_ops):
    w = torch.randn(8, 8, requires_grad=True)
    calls = []

    def loss():
        calls.append(1)
        return (torch.randn(4, 8) @ w).square().sum()

    counts = host_ops.count_step(loss, torch.device("cpu"))
    assert len(calls) == 2  # one uncounted step first
    assert counts["aten.mm"] >= 2  # the forward product and at least one gradient product
    assert all(n > 0 for n in counts.values())


def test_script_reports_our_ops_and_the_baseline(host_ops, capsys):
    assert host_ops.main(["--model", "tiny", "--seq_len", "16", "--top", "40"]) == 0
    out = capsys.readouterr().out
    assert "llmtrain.power_retention_fwd" in out and "llmtrain.power_retention_bwd" in out
    assert "gpt2 baseline (eager)" in out and "of them run kernels" in out


@pytest.mark.parametrize("argv", [["--seq_len", "1"], ["--model", "no-such-preset"]])
def test_bad_arguments_are_refused(host_ops, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        host_ops.main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
