"""Hugging Face glue shared by both models: weight init, the causal-LM loss, the decoder stack mixin, the head
mixins (causal LM and sequence classification on a decoder)."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)

from llmtrain.models.layers import NormLinear, OutputProjection, RMSNorm

try:  # transformers 5: init functions that skip tensors already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4
    from torch.nn import init


# transformers >= 5.24 names the cache field of its model outputs `cache`; `past_key_values` still works
# there, with a deprecation warning, until its announced removal (5.40). Use whichever field this
# version has, so outputs neither warn now nor break then.
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"


def output_cache(out):
    """The cache of a model output, under this transformers version's field name."""
    return getattr(out, CACHE_FIELD)


def cache_argument(past_key_values, kwargs: dict):
    """The cache a forward was given. transformers >= 5.24 passes it to forward as ``cache`` (earlier as
    ``past_key_values``, still accepted); a ``cache`` left in **kwargs would silently be ignored and every
    generation step would start from an empty cache."""
    cache = kwargs.pop("cache", None)
    if past_key_values is not None and cache is not None and cache is not past_key_values:
        raise ValueError("pass the cache once, as `cache` or as `past_key_values`, not two different ones")
    return past_key_values if past_key_values is not None else cache


def init_common_weights(module: nn.Module, config: PretrainedConfig) -> None:
    """GPT-2 / Llama initialisation: N(0, 0.02) weights, unit norms, residual projections / sqrt(2L)."""
    std = config.initializer_range
    if isinstance(module, OutputProjection):
        init.normal_(module.weight, mean=0.0, std=std / math.sqrt(2 * config.num_hidden_layers))
    elif isinstance(module, nn.Linear):
        init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, NormLinear):
        init.ones_(module.norm_weight)
        init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, RMSNorm):
        init.ones_(module.weight)


def slice_hidden_for_logits(hidden: Tensor, logits_to_keep) -> Tensor:
    """Keep the last ``logits_to_keep`` positions (0 keeps all; a tensor gives explicit indices).

    Generation asks for 1, so prefill does not project every prompt position onto the vocabulary.
    """
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
    return hidden[:, logits_to_keep]


def causal_lm_loss(logits: Tensor, labels: Optional[Tensor], num_items_in_batch: Optional[int | Tensor] = None,
                   ignore_index: int = -100, shift_labels: Optional[Tensor] = None) -> Tensor:
    """Next-token cross entropy in float32: logits[:, i] predicts labels[:, i + 1]; -100 is ignored.

    ``shift_labels`` (transformers' name) are targets already shifted: logits[:, i] predicts
    shift_labels[:, i]. With ``num_items_in_batch`` (gradient accumulation over micro-batches) the
    summed loss is divided by that count instead of this micro-batch's own count, as transformers'
    Trainer expects.
    """
    if shift_labels is not None:
        logits, targets = logits.float(), shift_labels.to(logits.device)
    else:
        logits = logits[:, :-1].float()
        targets = labels[:, 1:].to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return loss


def fused_cross_entropy_enabled(config: PretrainedConfig) -> bool:
    """The model config's ``fused_cross_entropy`` switch (default on; ``model_overrides`` can set it)."""
    value = getattr(config, "fused_cross_entropy", True)
    if not isinstance(value, bool):
        raise ValueError(f"fused_cross_entropy must be true or false, got {value!r}")
    return value


def lm_head_and_loss(lm_head: nn.Linear, hidden: Tensor, config: PretrainedConfig, labels: Optional[Tensor],
                     shift_labels: Optional[Tensor], num_items_in_batch: Optional[int | Tensor] = None):
    """(logits, loss) of a causal LM head.

    With ``shift_labels`` alone (already-shifted targets, as the pretraining loop passes them) and the
    config's ``fused_cross_entropy`` on, the loss is computed chunk by chunk from the hidden states
    (llmtrain.ops.cross_entropy) and logits come back None: the [batch, time, vocab] logits are never
    built. ``labels`` (HF style) keep the documented contract: logits and loss, both returned.
    """
    if shift_labels is not None and labels is None and fused_cross_entropy_enabled(config):
        from llmtrain.ops.cross_entropy import linear_cross_entropy

        if shift_labels.shape != hidden.shape[:-1]:
            raise ValueError(f"shift_labels must have shape {tuple(hidden.shape[:-1])}, got {tuple(shift_labels.shape)}")
        targets = shift_labels.to(hidden.device)
        if num_items_in_batch is None:
            return None, linear_cross_entropy(hidden, lm_head.weight, targets)
        return None, linear_cross_entropy(hidden, lm_head.weight, targets, reduction="sum") / num_items_in_batch
    logits = lm_head(hidden)
    if labels is None and shift_labels is None:
        return logits, None
    return logits, causal_lm_loss(logits, labels, num_items_in_batch, shift_labels=shift_labels)


def last_token_indices(input_ids: Optional[Tensor], batch_size: int, seq_len: int,
                       pad_token_id: Optional[int], device) -> Tensor:
    """Index of the last non-pad token of each row (HF Llama's rule; works for left or right padding).

    Without input_ids (embeddings given) or without a pad token the last position is used; a batch of
    several rows with no pad token is ambiguous and raises, as in transformers.
    """
    if pad_token_id is None and batch_size != 1:
        raise ValueError("sequence classification of a batch needs config.pad_token_id to find each row's last token")
    if pad_token_id is None or input_ids is None:
        return torch.full((batch_size,), seq_len - 1, dtype=torch.long, device=device)
    non_pad = (input_ids != pad_token_id).to(device=device, dtype=torch.int32)
    positions = torch.arange(seq_len, device=device, dtype=torch.int32)
    return (positions * non_pad).argmax(-1)


def sequence_classification_loss(logits: Tensor, labels: Tensor, config: PretrainedConfig) -> Tensor:
    """Regression (MSE) for one label, cross entropy for integer labels, BCE for multi-label, as in HF."""
    num_labels = config.num_labels
    problem = config.problem_type
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    logits = logits.float()
    if problem == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.float().view(-1)) if num_labels == 1 \
            else F.mse_loss(logits, labels.float())
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.float())


class DecoderStack:
    """Mixin for a family's decoder: `<Family>Model(DecoderStack, <Family>PreTrainedModel)`.

    Token embeddings ``embed_tokens``, ``num_hidden_layers`` blocks of the subclass's `block_class`
    (built as ``block_class(config, layer_idx)``) in ``layers``, and the final RMSNorm ``norm``. The
    subclass's forward does its own cache and mask handling between `_start_forward` (checks, flags,
    cache, input embeddings) and `_run_layers` (blocks, final norm, output)."""

    block_class: type

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.block_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _check_cache(self, past_key_values) -> None:
        """Raise TypeError unless ``past_key_values`` (not None) is the family's cache type."""
        raise NotImplementedError

    def _new_cache(self):
        """An empty cache of the family's type."""
        raise NotImplementedError

    def _start_forward(self, input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor], past_key_values,
                       use_cache: Optional[bool], output_hidden_states: Optional[bool], return_dict: Optional[bool]):
        """(input embeddings, cache or None, output_hidden_states, return_dict) for a forward.

        A cache is used when asked (``use_cache``) or, by default, when one is given: plain forwards do
        without. Gradient checkpointing in training turns it off."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if past_key_values is not None:
            self._check_cache(past_key_values)
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        use_cache = use_cache if use_cache is not None else past_key_values is not None
        if self.gradient_checkpointing and self.training:
            use_cache, past_key_values = False, None
        if use_cache and past_key_values is None:
            past_key_values = self._new_cache()
        cache = past_key_values if use_cache else None
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        return hidden, cache, output_hidden_states, return_dict

    def _run_layers(self, hidden: Tensor, layer_args: tuple, cache, output_hidden_states: bool, return_dict: bool):
        """Each block as ``layer(hidden, *layer_args, past_key_values=cache)``, then the final norm; the
        BaseModelOutputWithPast (or its tuple). Hidden states: the embeddings, each block's output but
        the last, and the normed final output."""
        all_hidden = (hidden,) if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, *layer_args, past_key_values=cache)
            if output_hidden_states:
                all_hidden += (hidden,)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (hidden,)
        out = BaseModelOutputWithPast(last_hidden_state=hidden, hidden_states=all_hidden, **{CACHE_FIELD: cache})
        return out if return_dict else out.to_tuple()


class DecoderWithHead:
    """Mixin for a head on a decoder: `<Family><Task>(<head mixin>, <Family>PreTrainedModel)`.

    The decoder, of the subclass's `base_model_class`, is `self.model` (the families'
    ``base_model_prefix``); `_init_head(config)` adds the head's modules before ``post_init()``. The
    input embeddings are the decoder's ``embed_tokens``."""

    base_model_class: type

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        self.model = self.base_model_class(config)
        self._init_head(config)
        self.post_init()

    def _init_head(self, config: PretrainedConfig) -> None:
        raise NotImplementedError

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value


class CausalLMHead(DecoderWithHead):
    """Mixin for `<Family>ForCausalLM(CausalLMHead, <Family>PreTrainedModel, GenerationMixin)`: a
    vocabulary projection ``lm_head`` tied to the decoder's input embeddings."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def _init_head(self, config: PretrainedConfig) -> None:
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def _causal_lm_output(self, out: BaseModelOutputWithPast, labels: Optional[Tensor], shift_labels: Optional[Tensor],
                          num_items_in_batch: Optional[int | Tensor], logits_to_keep: int | Tensor,
                          return_dict: bool):
        """Logits and loss (`lm_head_and_loss`) on the decoder's output ``out``, as CausalLMOutputWithPast
        (or its tuple)."""
        logits, loss = lm_head_and_loss(self.lm_head, slice_hidden_for_logits(out.last_hidden_state, logits_to_keep),
                                        self.config, labels, shift_labels, num_items_in_batch)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        **{CACHE_FIELD: output_cache(out)})
        return result if return_dict else result.to_tuple()


class SequenceClassificationHead(DecoderWithHead):
    """Mixin for `<Family>ForSequenceClassification(SequenceClassificationHead, <Family>PreTrainedModel)`:
    scores from the hidden state of each sequence's last non-pad token (reward and value models).
    The subclass names its decoder in `base_model_class`; extra keyword arguments (position_ids, ...)
    go to the decoder. ``use_cache`` is accepted (as transformers' own classifiers do; TRL's
    RewardTrainer passes ``use_cache=False``) and ignored: scoring never keeps a cache."""

    def _init_head(self, config: PretrainedConfig) -> None:
        self.num_labels = config.num_labels
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                         use_cache=False, output_hidden_states=output_hidden_states, return_dict=True, **kwargs)
        hidden = out.last_hidden_state
        b, t = hidden.shape[:2]
        last = last_token_indices(input_ids, b, t, self.config.pad_token_id, hidden.device)
        logits = self.score(hidden[torch.arange(b, device=hidden.device), last])
        loss = sequence_classification_loss(logits, labels, self.config) if labels is not None else None
        result = SequenceClassifierOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return result if return_dict else result.to_tuple()
