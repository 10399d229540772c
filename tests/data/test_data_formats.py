import pytest
import torch

from llmtrain.data import (IGNORE_INDEX, DataProcessor, PackingCollator, PaddingCollator, PreferenceCollator,
                           encode_messages, encode_preference, oasst_conversations, parse_hh_dialogue,
                           to_messages, to_preference)
from llmtrain.data.sources import iter_rows, resolve_source


def response_text(tokenizer, batch, row):
    """Decode the tokens that count in the loss for one row of a shifted batch."""
    keep = batch["labels"][row] != IGNORE_INDEX
    return tokenizer.decode(batch["labels"][row][keep].tolist())


def test_layouts_to_messages():
    alpaca = to_messages({"instruction": "Add.", "input": "2+2", "output": "4"}, "alpaca")
    assert alpaca == [{"role": "user", "content": "Add.\n\n2+2"}, {"role": "assistant", "content": "4"}]
    dolly = to_messages({"instruction": "Q?", "context": "", "response": "A.", "category": "open_qa"}, "dolly")
    assert dolly[0]["content"] == "Q?" and dolly[1]["content"] == "A."
    sharegpt = to_messages({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
                           "messages")
    assert [m["role"] for m in sharegpt] == ["user", "assistant"]
    with pytest.raises(ValueError, match="unknown chat role 'narrator'"):
        to_messages({"messages": [{"role": "narrator", "content": "x"}]}, "messages")


def test_loss_mask_covers_assistant_turns_only(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"},
                {"role": "assistant", "content": "Rome."}]
    enc = encode_messages(messages, tokenizer)
    masked = tokenizer.decode([t for t, m in zip(enc["input_ids"], enc["loss_mask"]) if m])
    assert masked == "Paris.<|im_end|>Rome.<|im_end|>"
    batch = PaddingCollator(tokenizer.pad_token_id)([enc])
    assert response_text(tokenizer, batch, 0) == masked
    assert "France" in tokenizer.decode(batch["input_ids"][0].tolist())


def test_loss_mask_without_generation_markers_in_the_template(tokenizer):
    plain = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    original = tokenizer.chat_template
    tokenizer.chat_template = plain
    try:
        enc = encode_messages([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
                              tokenizer)
    finally:
        tokenizer.chat_template = original
    masked = tokenizer.decode([t for t, m in zip(enc["input_ids"], enc["loss_mask"]) if m])
    assert masked.startswith("Hello.<|im_end|>") and "Hi" not in masked


def test_padding_collator_shapes_and_padding(tokenizer):
    short = encode_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tokenizer)
    long = encode_messages([{"role": "user", "content": "a long question " * 5},
                            {"role": "assistant", "content": "a long answer " * 5}], tokenizer)
    batch = PaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)([short, long])
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= len(long["input_ids"]) - 1
    n = len(short["input_ids"]) - 1
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)
    assert (batch["input_ids"][0, n:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert response_text(tokenizer, batch, 1) == ("a long answer " * 5) + "<|im_end|>"


def test_packing_collator(tokenizer):
    examples = [encode_messages([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"r{i}"}],
                                tokenizer) for i in range(6)]
    n = len(examples[0]["input_ids"]) - 1
    batch = PackingCollator(seq_len=2 * n + 1, pad_token_id=tokenizer.pad_token_id)(examples)
    assert batch["input_ids"].shape == (3, 2 * n + 1)
    assert batch["position_ids"][0].tolist() == list(range(n)) + list(range(n)) + [0]
    assert batch["document_ids"][0].tolist() == [0] * n + [1] * n + [-1]
    assert response_text(tokenizer, batch, 0) == "r0<|im_end|>r1<|im_end|>"


def test_hh_rlhf_pairs(tokenizer):
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: A good one.",
           "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: No."}
    pair = to_preference(row, "hh-rlhf")
    assert [m["content"] for m in pair.prompt] == ["Hi", "Hello!", "Joke?"]
    assert pair.chosen == "A good one." and pair.rejected == "No."
    encoded = encode_preference(pair, tokenizer)
    batch = PreferenceCollator(tokenizer.pad_token_id)([encoded])
    assert response_text(tokenizer, {"labels": batch["chosen_labels"]}, 0) == "A good one.<|im_end|>"
    assert response_text(tokenizer, {"labels": batch["rejected_labels"]}, 0) == "No.<|im_end|>"
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    with pytest.raises(ValueError, match="not an HH-RLHF dialogue"):
        parse_hh_dialogue("Human: missing the blank lines")


def test_ultrafeedback_and_rewardbench_pairs():
    row = {"prompt": "2+2?", "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
           "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]}
    pair = to_preference(row, "ultrafeedback")
    assert pair.prompt == [{"role": "user", "content": "2+2?"}] and (pair.chosen, pair.rejected) == ("4", "5")
    rb = to_preference({"prompt": "p", "chosen": "c", "rejected": "r", "subset": "chat"}, "rewardbench")
    assert rb.prompt[0]["content"] == "p" and rb.chosen == "c"


def test_oasst_trees_follow_best_ranked_replies():
    rows = [{"message_id": "a", "parent_id": None, "role": "prompter", "text": "Q"},
            {"message_id": "b", "parent_id": "a", "role": "assistant", "text": "worse", "rank": 1},
            {"message_id": "c", "parent_id": "a", "role": "assistant", "text": "best", "rank": 0},
            {"message_id": "d", "parent_id": "c", "role": "prompter", "text": "thanks"},
            {"message_id": "e", "parent_id": None, "role": "prompter", "text": "unanswered"}]
    assert list(oasst_conversations(rows)) == [[{"role": "user", "content": "Q"},
                                                {"role": "assistant", "content": "best"},
                                                {"role": "user", "content": "thanks"}]]


@pytest.mark.parametrize("name", ["dolly-sample", "chat-sample", "hh-rlhf-sample", "ultrafeedback-sample"])
def test_bundled_samples_parse(name, tokenizer):
    source = resolve_source(name)
    rows = list(iter_rows(source))
    assert len(rows) >= 50
    for row in rows:
        if source.layout in ("hh-rlhf", "ultrafeedback"):
            pair = to_preference(row, source.layout)
            assert pair.chosen != pair.rejected and pair.prompt
        else:
            assert to_messages(row, source.layout)[-1]["role"] == "assistant"


def test_data_processor_pretraining_batches(tmp_path):
    processor = DataProcessor(seq_len=64, batch_size=4, out_dir=tmp_path)
    batches = list(processor.prepare_training_data(dataset_name="shakespeare", num_samples=40))
    assert len(batches) > 10
    assert batches[0]["input_ids"].shape == (4, 64) and batches[0]["labels"].dtype == torch.int64
    assert torch.equal(batches[0]["input_ids"][:, 1:], batches[0]["labels"][:, :-1])
    meta_file = tmp_path / "shards" / "shakespeare" / "meta.json"
    mtime = meta_file.stat().st_mtime_ns
    again = list(processor.prepare_training_data(dataset_name="shakespeare", num_samples=40))
    assert meta_file.stat().st_mtime_ns == mtime  # reused, not re-prepared
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))


def test_data_processor_sft_and_preference_batches(tmp_path, tokenizer):
    processor = DataProcessor(tokenizer=tokenizer, seq_len=256, batch_size=4, out_dir=tmp_path)
    sft = list(processor.prepare_training_data(dataset_name="dolly-sample", num_samples=10))
    assert [b["input_ids"].shape[0] for b in sft] == [4, 4, 2]
    assert all((b["labels"] != IGNORE_INDEX).any(dim=1).all() for b in sft)
    prefs = next(processor.prepare_training_data(dataset_name="hh-rlhf-sample", num_samples=4))
    assert {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"} <= set(prefs)
    assert prefs["chosen_input_ids"].shape[0] == 4
