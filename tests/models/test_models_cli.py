"""`llmtrain generate` (models/cli.py): streams a completion of the prompt from a saved model."""

import argparse

import pytest
import torch

from llmtrain.models import RetentionLLM, cli

from .configs import small_retention


def parse(*argv):
    parser = argparse.ArgumentParser(prog="llmtrain")
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["generate", *argv])


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny model saved with the bundled tokenizer (or a byte-level one if the data package is absent)."""
    try:
        from llmtrain.data import load_tokenizer
        tokenizer = load_tokenizer()
    except ImportError:
        pytest.skip("llmtrain.data (the bundled tokenizer) is not available")
    path = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    config = small_retention(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    RetentionLLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer


def test_generate_streams_prompt_and_new_tokens(saved_model, capsys):
    path, tokenizer = saved_model
    args = parse("--model", str(path), "--prompt", "To be, or not to be", "--max-new-tokens", "8", "--seed", "3")
    assert args.func is cli.run
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("To be, or not to be")
    assert len(printed) > len("To be, or not to be")


def test_generate_is_reproducible_with_a_seed_and_greedy_is_fixed(saved_model, capsys):
    path, _ = saved_model
    outputs = []
    for argv in (["--seed", "5"], ["--seed", "5"], ["--greedy"], ["--greedy", "--seed", "9"]):
        args = parse("--model", str(path), "--prompt", "Hello", "--max-new-tokens", "10", *argv)
        assert args.func(args) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert outputs[2] == outputs[3]


def test_generate_reports_a_missing_model(tmp_path, capsys):
    args = parse("--model", str(tmp_path / "nowhere"), "--prompt", "hi")
    assert args.func(args) == 1
    assert "not a saved model" in capsys.readouterr().err


def test_generate_rejects_a_tokenizer_larger_than_the_vocabulary(saved_model, tmp_path, capsys):
    _, tokenizer = saved_model
    RetentionLLM(small_retention(vocab_size=50)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    args = parse("--model", str(tmp_path), "--prompt", "hi")
    assert args.func(args) == 1
    assert "tokens but the model only 50" in capsys.readouterr().err
