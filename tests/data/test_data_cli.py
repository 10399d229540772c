import argparse
import json

from llmtrain.data import cli


def test_register_adds_a_data_command_with_exit_codes(tmp_path, corpus_file, capsys):
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "prepare", str(corpus_file), "--out", str(tmp_path / "o"), "--phase", "p1",
                              "--no-progress", "--val-fraction", "0.1"])
    assert args.func(args) == 0
    assert "kept" in capsys.readouterr().out
    meta = json.loads((tmp_path / "o" / "shards" / "p1" / "meta.json").read_text())
    assert meta["docs_kept"]["val"] >= 1
    args = parser.parse_args(["data", "inspect", str(tmp_path / "o" / "shards" / "p1" / "val")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "format v1" in out and "uint16" in out and "vocab 8192" in out


def test_standalone_main_list_and_errors(tmp_path, capsys):
    assert cli.main(["list", "--stage", "fine-tuning"]) == 0
    out = capsys.readouterr().out
    assert "dolly-15k" in out and "CC BY-SA 3.0" in out and "fineweb-edu" not in out
    assert cli.main(["prepare", "no-such-dataset", "--out", str(tmp_path), "--no-progress"]) == 1
    assert "known datasets" in capsys.readouterr().err
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"garbage" * 20)
    assert cli.main(["inspect", str(bad)]) == 1
    assert "bad.bin: not an llmtrain shard" in capsys.readouterr().err
