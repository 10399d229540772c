"""`llmtrain data {prepare,list,inspect}`; also runnable as `python -m llmtrain.data.cli ...`."""

from __future__ import annotations

import argparse
import functools
import sys


def _reports_errors(func):
    """Data problems (bad file, unknown name, empty input) become one line on stderr and exit code 1."""
    @functools.wraps(func)
    def wrapper(args) -> int:
        from llmtrain.data.sources import DataSourceError

        try:
            return func(args)
        except (DataSourceError, ValueError, OSError, KeyError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return wrapper


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare, list and inspect training data",
                                 description="Prepare, list and inspect training data.")
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

    p = commands.add_parser("prepare", help="tokenize and pack a corpus into .bin shards",
                            description="Tokenize a corpus and pack it into <out>/shards/<phase>/{train,val}/*.bin.")
    p.add_argument("source", nargs="?", default="shakespeare",
                   help="bundled name (shakespeare), catalog name (fineweb-edu, ...), owner/name Hub repo, "
                        "or local .txt/.jsonl/.json/.parquet files, directory or glob (default: shakespeare)")
    p.add_argument("--out", default="data", help="output root (default: data)")
    p.add_argument("--phase", default="pretrain", help="phase name, a subdirectory of <out>/shards")
    p.add_argument("--tokenizer", default=None, help="tokenizer name or path (default: bundled 8k BPE)")
    p.add_argument("--num-samples", type=int, default=None, help="read at most this many documents")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (approximate)")
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--no-dedup", dest="dedup", action="store_false", help="keep exact duplicates")
    p.add_argument("--near-dup-threshold", type=float, default=0.8,
                   help="MinHash similarity above which a document is dropped; 0 disables (default 0.8)")
    p.add_argument("--toxicity-threshold", type=float, default=None,
                   help="drop documents scored >= this by detoxify (needs `pip install detoxify`)")
    p.add_argument("--text-field", default=None, help="column holding the text (default: text)")
    p.add_argument("--split", default=None, help="dataset split to read (Hub datasets)")
    p.add_argument("--txt-sample-by", choices=("line", "paragraph", "document"), default="paragraph",
                   help="how .txt files are cut into documents (default: paragraph)")
    p.add_argument("--batch-size", type=int, default=512, help="documents per tokenizer batch")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_prepare)

    ls = commands.add_parser("list", help="list the dataset catalog")
    ls.add_argument("--stage", default=None, choices=("pretraining", "fine-tuning", "preference", "evaluation"))
    ls.set_defaults(func=_list)

    ins = commands.add_parser("inspect", help="validate shards and show their header and a sample")
    ins.add_argument("paths", nargs="+", help=".bin files or directories of shards")
    ins.add_argument("--tokenizer", default=None, help="decode the sample with this tokenizer")
    ins.add_argument("--show", type=int, default=200, help="characters of the first document to print")
    ins.set_defaults(func=_inspect)


@_reports_errors
def _prepare(args) -> int:
    from llmtrain.data.pipeline import prepare

    threshold = args.near_dup_threshold if args.near_dup_threshold else None
    stats = prepare(args.source, args.out, phase=args.phase, tokenizer=args.tokenizer,
                    num_samples=args.num_samples, val_fraction=args.val_fraction,
                    shard_tokens=args.shard_tokens, min_tokens=args.min_tokens, max_tokens=args.max_tokens,
                    dedup=args.dedup, near_dup_threshold=threshold, toxicity_threshold=args.toxicity_threshold,
                    text_field=args.text_field, split=args.split, txt_sample_by=args.txt_sample_by,
                    batch_size=args.batch_size, progress=args.progress)
    print(stats.summary())
    return 0


@_reports_errors
def _list(args) -> int:
    from llmtrain.data.catalog import list_datasets

    rows = [(d.name, d.stage, d.hf_path, d.size, d.license) for d in list_datasets(args.stage)]
    header = ("name", "stage", "hub path", "size", "licence")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    return 0


@_reports_errors
def _inspect(args) -> int:
    from pathlib import Path

    from llmtrain.data.shards import Shard, list_shards

    paths = [p for arg in args.paths for p in (list_shards(arg) if Path(arg).is_dir() else [Path(arg)])]
    tokenizer = None
    if args.show:
        from llmtrain.data.tokenizer import load_tokenizer, tokenizer_fingerprint
        tokenizer = load_tokenizer(args.tokenizer)
    for path in paths:
        shard = Shard(path)
        h = shard.header
        print(f"{path}: format v{h.version}, {h.num_tokens:,} tokens ({h.dtype.name}), {h.num_docs:,} documents, "
              f"vocab {h.vocab_size}, tokenizer {h.fingerprint.hex()}")
        if tokenizer is not None and h.num_docs:
            if tokenizer_fingerprint(tokenizer) != h.fingerprint:
                print("  (tokenizer differs from the one that wrote this shard; not decoding)")
            else:
                first = next(shard.documents())
                print("  " + repr(tokenizer.decode(first.tolist())[: args.show]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmtrain.data.cli")
    register(parser.add_subparsers(dest="command", metavar="COMMAND"))
    args = parser.parse_args(["data", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
