"""TRL's trainers run on our models through the transformers Auto classes (trl comes with the `test` extras)."""

import trl


def test_trl_sft_and_reward_trainers_on_our_models(tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import llmtrain.models  # noqa: F401  (registers the Auto classes)
    from llmtrain.data import load_tokenizer
    from tests.training.test_post_common import base_model_dir

    path = base_model_dir()
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "RetentionLLM"
    chats = Dataset.from_list([{"messages": [{"role": "user", "content": f"Is {n} even?"},
                                             {"role": "assistant", "content": "Yes." if n % 2 == 0 else "No."}]}
                               for n in range(16)])
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-3, max_length=48, report_to=[], use_cpu=True, save_strategy="no",
                         logging_steps=1, assistant_only_loss=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=chats, processing_class=tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert any(not p.detach().equal(before[n]) for n, p in model.named_parameters())
    assert all(log["loss"] > 0 for log in trainer.state.log_history if "loss" in log)

    reward_model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    pairs = Dataset.from_list([{"prompt": [{"role": "user", "content": f"Is {n} even?"}],
                                "chosen": [{"role": "assistant", "content": "Yes."}],
                                "rejected": [{"role": "assistant", "content": "No."}]} for n in range(16)])
    args = trl.RewardConfig(output_dir=str(tmp_path / "rm"), max_steps=3, per_device_train_batch_size=4,
                            learning_rate=1e-3, max_length=48, report_to=[], use_cpu=True, save_strategy="no")
    trl.RewardTrainer(model=reward_model, args=args, train_dataset=pairs, processing_class=tokenizer).train()
