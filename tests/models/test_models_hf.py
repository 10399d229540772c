"""Hugging Face integration: save/load, Auto classes by path, generate(), sequence classification."""

import dataclasses
import json

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from llmtrain.models import (
    MLAForCausalLM,
    MLAForSequenceClassification,
    MLAModel,
    RetentionForSequenceClassification,
    RetentionLLM,
    RetentionModel,
    build_model,
)

from llmtrain.models.hf import CACHE_FIELD, output_cache

from .configs import PAD, VOCAB, small_mla, small_retention

KINDS = {
    "retention": (small_retention, RetentionLLM, RetentionForSequenceClassification, RetentionModel),
    "mla": (small_mla, MLAForCausalLM, MLAForSequenceClassification, MLAModel),
}


def tokens(batch, length, seed=1):
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=list(KINDS))
def kind(request):
    return request.param


def make(kind, **overrides):
    torch.manual_seed(0)
    return KINDS[kind][1](KINDS[kind][0](**overrides)).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip_gives_identical_logits(kind, tied, tmp_path):
    model = make(kind, tie_word_embeddings=tied)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == f"llmtrain_{kind}"
    loaded = type(model).from_pretrained(tmp_path).eval()
    ids = tokens(2, 9)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # tying (or its absence) survives the reload
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied


def test_auto_classes_load_by_path(kind, tmp_path):
    model = make(kind)
    model.save_pretrained(tmp_path)
    _, causal_lm, classifier, base = KINDS[kind]
    assert type(AutoConfig.from_pretrained(tmp_path)) is type(model.config)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(auto) is causal_lm
    ids = tokens(1, 6)
    with torch.no_grad():
        assert torch.equal(auto(ids).logits, model(ids).logits)
        hidden = AutoModel.from_pretrained(tmp_path).eval()(ids).last_hidden_state
    torch.testing.assert_close(model.lm_head(hidden), model(ids).logits)
    scorer = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1)
    assert type(scorer) is classifier
    # the backbone weights come from the checkpoint, only the score head is new
    torch.testing.assert_close(scorer.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert type(build_model(model.config, "base")) is base


@pytest.mark.parametrize("sampling", [
    dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.3),
    dict(do_sample=True, temperature=1.5, top_k=5),
])
def test_sampling_is_deterministic_under_a_seed(kind, sampling):
    model = make(kind)
    ids = tokens(2, 5)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(model.generate(ids, max_new_tokens=12, eos_token_id=None, pad_token_id=PAD, **sampling))
    assert runs[0].shape == (2, 17)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    assert torch.equal(runs[0][:, :5], ids)


def test_greedy_generation_follows_the_argmax_of_the_forward(kind):
    model = make(kind)
    ids = tokens(1, 4)
    generated = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
    expected = ids
    with torch.no_grad():
        for _ in range(6):
            expected = torch.cat([expected, model(expected).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, expected)


def test_eos_stops_generation_and_pads_finished_rows(kind):
    model = make(kind)
    ids = tokens(2, 4)
    free = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
    first_token = int(free[0, 4])            # make row 0's first greedy token the eos
    stopped = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=first_token, pad_token_id=PAD)
    assert stopped[0, 4] == first_token
    assert (stopped[0, 5:] == PAD).all()


def test_repetition_penalty_changes_greedy_output(kind):
    model = make(kind)
    ids = tokens(1, 6)
    plain = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None)
    penalised = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, repetition_penalty=5.0)
    new = penalised[0, 6:].tolist()
    # an untrained model repeats itself greedily; a strong penalty breaks the loops
    assert len(set(new)) > len(set(plain[0, 6:].tolist()))


def test_beam_search_and_several_return_sequences(kind):
    model = make(kind)
    ids = tokens(2, 4)
    out = model.generate(ids, max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False,
                         eos_token_id=None)
    assert out.shape == (4, 9)
    assert torch.equal(out[0, :4], ids[0]) and torch.equal(out[3, :4], ids[1])


def test_sequence_classification_pools_the_last_non_pad_token(kind):
    torch.manual_seed(0)
    config = KINDS[kind][0](num_labels=3)
    model = KINDS[kind][2](config).eval()
    ids = tokens(2, 7)
    right_padded = ids.clone()
    right_padded[0, 5:] = PAD
    with torch.no_grad():
        scores = model(right_padded).logits
        row0 = model(ids[:1, :5]).logits
        row1 = model(ids[1:]).logits
        hidden = model.model(right_padded).last_hidden_state
    assert scores.shape == (2, 3)
    torch.testing.assert_close(scores[0], row0[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[1], row1[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[0], model.score(hidden[0, 4]), atol=1e-6, rtol=1e-6)

    labels = torch.tensor([2, 0])
    out = model(right_padded, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    out.loss.backward()
    assert model.score.weight.grad.abs().sum() > 0


def test_reward_head_regression_loss(kind):
    torch.manual_seed(0)
    model = KINDS[kind][2](KINDS[kind][0](num_labels=1))
    out = model(tokens(2, 5), labels=torch.tensor([0.5, -1.0]))
    assert out.logits.shape == (2, 1)
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1),
                                                                      torch.tensor([0.5, -1.0])))


def test_sequence_classification_accepts_use_cache(kind):
    """TRL's RewardTrainer calls the model with use_cache=False; the classifier takes it (and never caches)."""
    torch.manual_seed(0)
    model = KINDS[kind][2](KINDS[kind][0](num_labels=1)).eval()
    ids = tokens(2, 5)
    with torch.no_grad():
        expected = model(ids).logits
        for use_cache in (False, True):
            torch.testing.assert_close(model(ids, use_cache=use_cache).logits, expected, atol=0, rtol=0)


def test_classifying_a_batch_needs_a_pad_token(kind):
    torch.manual_seed(0)
    model = KINDS[kind][2](KINDS[kind][0](pad_token_id=None))
    with pytest.raises(ValueError, match="pad_token_id"):
        model(tokens(2, 5))


def test_outputs_and_generation_use_this_transformers_cache_name(kind, monkeypatch):
    """transformers >= 5.24 renamed the model outputs' cache field to `cache` and warns on the old name
    (removal announced for 5.40): our outputs, the recurrent state and generation use the installed
    version's name, so none of it warns."""
    from transformers.utils import generic

    seen = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: seen.append(str(msg)))
    model = make(kind)
    ids = tokens(1, 5)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        assert output_cache(out) is not None
        assert CACHE_FIELD in {f.name for f in dataclasses.fields(type(out))}
        assert CACHE_FIELD in model.config.keys_to_ignore_at_inference  # (HF Trainer's evaluation drops it)
        model.generate(ids, max_new_tokens=3, do_sample=False)
    assert not [m for m in seen if "Use `cache` instead" in m], seen


def test_forward_takes_the_cache_under_either_name(kind):
    """transformers >= 5.24 hands the cache to forward as `cache` (before: `past_key_values`). A cache
    under the new name must be used, not dropped into **kwargs (which made every MLA generation step
    start from an empty cache); two different caches at once are an error."""
    model = make(kind)
    ids = tokens(1, 5)
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        for name in ("cache", "past_key_values"):
            cache = model.model._new_cache()
            model(ids[:, :4], use_cache=True, **{name: cache})
            step = model(ids[:, 4:], use_cache=True, **{name: cache}).logits[:, -1]
            assert torch.allclose(step, full, rtol=1e-4, atol=1e-4), name
        with pytest.raises(ValueError, match="pass the cache once"):
            model(ids, cache=model.model._new_cache(), past_key_values=model.model._new_cache())
