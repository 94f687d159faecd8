"""BERT-architecture text encoder: token ids -> contextual token features for the fusion."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import huggingface_hub
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, BertConfig, PreTrainedConfig, PreTrainedModel


class BertTextEncoder(nn.Module):
    """(input_ids [B, N], attention_mask [B, N]) -> last hidden state [B, N, hidden_size].

    ``pretrained`` loads ``name_or_path`` through ``AutoModel`` (any BERT-architecture
    checkpoint); otherwise the architecture comes from ``config`` overrides on ``BertConfig``
    (whose defaults are bert-base-uncased) or from ``name_or_path``'s config, randomly
    initialised. ``vocab_size`` is the tokenizer's size: it sizes a random-init embedding
    and grows a pretrained one when the tokenizer added tokens.
    """

    def __init__(
        self,
        name_or_path: str | None = "bert-base-uncased",
        pretrained: bool = True,
        config: Mapping[str, Any] | None = None,
        vocab_size: int | None = None,
        freeze: bool = False,
        gradient_checkpointing: bool = False,
        attn_implementation: str | None = None,
    ) -> None:
        super().__init__()
        overrides = dict(config or {})
        if attn_implementation is not None:
            overrides["attn_implementation"] = attn_implementation
        if pretrained:
            if name_or_path is None:
                raise ValueError("pretrained=True needs name_or_path (a hub id or a local dir)")
            self.model = _from_hub(AutoModel.from_pretrained, name_or_path, **overrides)
        else:
            if vocab_size is not None:
                overrides["vocab_size"] = vocab_size
            bert_config = (
                BertConfig(**overrides)
                if name_or_path is None
                else _from_hub(AutoConfig.from_pretrained, name_or_path, **overrides)
            )
            self.model = AutoModel.from_config(bert_config)
        if vocab_size is not None and vocab_size > self.model.get_input_embeddings().num_embeddings:
            self.model.resize_token_embeddings(vocab_size)
        # Only token features are used: an unused pooler would leave parameters without
        # gradients, which DDP rejects.
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None
        if gradient_checkpointing:
            self.model.activation_checkpointing_enable()
        self.frozen = freeze
        if freeze:
            self.model.requires_grad_(False)
        self.train()

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def train(self, mode: bool = True) -> BertTextEncoder:
        """A frozen encoder stays in eval mode (no dropout), so its features are deterministic."""
        super().train(mode and not self.frozen)
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if self.model.config._attn_implementation == "sdpa":
            attention_mask = _sdpa_mask(attention_mask)
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _sdpa_mask(attention_mask: Tensor) -> Tensor:
    """The [B, 1, N, N] boolean mask transformers builds for SDPA from a [B, N] padding mask.

    Given the 2D mask, transformers first asks ``attention_mask.all()`` (no padding at all: no
    mask, which lets SDPA pick its flash kernel), a host read that makes every forward wait for
    the GPU. A 4D mask is used as it is. Where the batch has padding this is the very mask it
    would build; where it has none, a mask of ones adds zeros (bit-identical on CPU; on a GPU
    such a batch may run another SDPA kernel than flash).
    """
    n = attention_mask.shape[1]
    return attention_mask.bool()[:, None, None, :].expand(-1, 1, n, n)


def _from_hub(
    load: Callable[..., PreTrainedModel | PreTrainedConfig], name: str, **kwargs: Any
) -> PreTrainedModel | PreTrainedConfig:
    """Load from the local cache first, then the hub; offline, fail fast with what to do."""
    try:
        return load(name, local_files_only=True, **kwargs)
    except OSError as err:
        cache_error = err
    if not huggingface_hub.is_offline_mode():
        try:
            return load(name, **kwargs)
        except OSError as err:
            cache_error = err
    raise OSError(
        f"Could not load {name!r}: it is not a local directory, not in the Hugging Face cache "
        f"({huggingface_hub.constants.HF_HUB_CACHE}) and the hub is unreachable or offline mode "
        f"is on. On a machine with network run `hf download {name}` (or `huggingface-cli "
        f"download {name}`) and point HF_HOME at that cache, or set name_or_path to a local "
        f"directory, or use the offline config model/text=bert_tiny."
    ) from cache_error
