"""Rebuild a trained :class:`~vqa.models.vqa_model.VQAModel` from a Lightning checkpoint.

Shared by evaluation, prediction and export. A checkpoint is untrusted input: it is read with
``torch.load(weights_only=True)`` (no pickled code), and the ``_target_`` entries of the config
it carries may only name classes of this package (``vqa.models.*`` / ``vqa.data.*``), because
Hydra would otherwise call whatever a crafted config names. Anything that does not fit (a
corrupted file, weights of another fusion block, a head sized for another vocabulary) raises a
:class:`CheckpointError` that says what is wrong and with which file.
"""

from __future__ import annotations

import copy
import pickle
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from torch import Tensor
from transformers import PreTrainedTokenizerFast

from vqa.data.answers import AnswerVocab
from vqa.data.artifacts import artifacts_from_dict
from vqa.models.fusion.base import upgrade_legacy_keys
from vqa.models.vqa_model import VQAModel, data_model_args

REQUIRED_HPARAMS = ("run_config", "answer_vocab", "data_artifacts")
NET_PREFIX = "net."  # the LightningModule holds the VQAModel as `net`
MODEL_TARGET_PREFIX = "vqa.models."
DATA_TARGET_PREFIX = "vqa.data."
MAX_KEYS_SHOWN = 4
# Key prefixes that only a model with visual streams or conditioning fields has.
STREAM_AND_CONDITIONING_KEYS = (
    "conditioning.",
    "fusion.blocks.",
    "fusion.combiner.",
    "fusion.stream_embedding.",
    "visual.0.",
)
# Data config keys of older checkpoints that the datamodule no longer takes: the tokenizer was
# named there, and is now chosen by the text encoder's config (and travels in the checkpoint).
RETIRED_DATA_KEYS = ("tokenizer_name",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


@dataclass
class TrainedModel:
    """A model rebuilt from a checkpoint (eval mode, CPU) with its data-side artifacts."""

    model: VQAModel
    answer_vocab: AnswerVocab
    tokenizer: PreTrainedTokenizerFast
    run_config: dict[str, Any]
    hparams: dict[str, Any]
    path: Path

    @property
    def data_config(self) -> dict[str, Any]:
        """The resolved data config of the training run (a copy: callers override paths),
        without the keys the datamodule no longer takes."""
        data = copy.deepcopy(self.run_config["data"])
        for key in RETIRED_DATA_KEYS:
            data.pop(key, None)
        return data

    @property
    def image_size(self) -> int:
        return int(self.run_config["data"]["image_size"])

    @property
    def max_question_length(self) -> int:
        return int(self.run_config["data"]["max_question_length"])

    @property
    def question_types(self) -> list[str]:
        return list(self.hparams.get("question_types") or [])

    @property
    def loss(self) -> str:
        """``bce`` (independent sigmoid scores) or ``ce`` (softmax over answers)."""
        return str(self.hparams.get("loss", "bce"))

    @property
    def fusion_name(self) -> str:
        return self.run_config["model"]["fusion"]["_target_"].rsplit(".", 1)[-1]

    @property
    def streams(self) -> list[str] | None:
        """The visual streams' names the model reads, in order (None: one image per
        question)."""
        streams = self.hparams.get("streams")
        return None if streams is None else list(streams)

    @property
    def conditioning_vocab(self) -> dict[str, list[str]] | None:
        """Per conditioning field, its known values in index order (value i is index i + 1,
        0 the unknown): what a datamodule maps labels with (``use_conditioning_vocab``). None:
        no conditioning fields."""
        vocab = self.hparams.get("conditioning_vocab")
        return None if vocab is None else {f: list(values) for f, values in vocab.items()}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` on CPU, with every failure turned into a clear error."""
    path = Path(path)
    if path.is_dir():
        hint = next(iter(sorted(path.glob("**/last.ckpt"))), None)
        raise CheckpointError(
            f"{path} is a folder, not a checkpoint file"
            + (f"; did you mean {hint}?" if hint else "; pass a .ckpt file")
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise CheckpointError(
                f"{path} holds Python objects other than tensors and plain data, so it is "
                "refused: checkpoints are read with weights_only=True so that loading one can "
                "never run code. Use a checkpoint written by this framework's training."
            ) from err
        raise CheckpointError(f"{path} is corrupted or not a PyTorch checkpoint ({err})") from err
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as err:
        raise CheckpointError(
            f"{path} is corrupted or not a PyTorch checkpoint (truncated copy or interrupted "
            f"save?): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{path}: expected a checkpoint dict, got {type(checkpoint).__name__}"
        )
    return checkpoint


def check_targets(config: Any, prefix: str, where: str) -> None:
    """Every ``_target_`` in ``config`` must be a class under ``prefix``; checked before any
    instantiation, so a crafted config cannot make Hydra call e.g. ``os.system``."""
    for target in _targets(config):
        if not isinstance(target, str) or not target.startswith(prefix):
            raise CheckpointError(
                f"{where}: _target_ {target!r} is outside {prefix}*; refusing to instantiate it "
                "(a checkpoint's config may only name classes of this package)"
            )
        try:
            get_class(target)
        except (ImportError, ValueError) as err:
            raise CheckpointError(
                f"{where}: _target_ {target!r} is not a class of this version of the package "
                f"(written by another version?): {err}"
            ) from err


def _targets(node: Any) -> Iterator[Any]:
    if isinstance(node, Mapping):
        if "_target_" in node:
            yield node["_target_"]
        for value in node.values():
            yield from _targets(value)
    elif isinstance(node, list | tuple):
        for value in node:
            yield from _targets(value)


def build_model(
    model_config: Mapping[str, Any],
    num_answers: int,
    vocab_size: int | None,
    where: str = "model config",
    *,
    streams: Sequence[str] | None = None,
    conditioning: Mapping[str, int] | None = None,
) -> VQAModel:
    """Instantiate the architecture of ``model_config`` with random weights.

    Pretrained weights (ImageNet ResNet, hub BERT) are switched off: the checkpoint's weights
    replace them anyway, so downloading them would only cost time and need a network. A hub
    BERT's *config* is still read (from the local cache first) to know its architecture.
    ``streams`` and ``conditioning`` are the training run's, which its datamodule filled in
    (:func:`recorded_model_args` reads them from a checkpoint's hyper-parameters); None: not
    used.
    """
    check_targets(model_config, MODEL_TARGET_PREFIX, where)
    cfg = OmegaConf.create(copy.deepcopy(dict(model_config)))
    cfg.visual.weights = None
    if "pretrained" in cfg.text:
        cfg.text.pretrained = False
    with warnings.catch_warnings():
        # ResNetEncoder warns about frozen BN with random weights; ours arrive right after.
        warnings.filterwarnings("ignore", message="bn='frozen' with random weights")
        recorded = {"streams": streams, "conditioning": conditioning}
        model = instantiate(
            cfg,
            num_answers=num_answers,
            vocab_size=vocab_size,
            **{key: value for key, value in recorded.items() if value is not None},
        )
    if not isinstance(model, VQAModel):
        raise CheckpointError(f"{where} builds a {type(model).__name__}, not a VQAModel")
    return model


def recorded_model_args(hparams: Mapping[str, Any], where: str = "checkpoint") -> dict[str, Any]:
    """The ``VQAModel`` arguments a training run took from its datamodule, as its lit module
    recorded them (``streams``, ``conditioning_vocab``), for :func:`build_model`: ``streams``
    and ``conditioning`` (values per field). Empty for a checkpoint without them (one image
    per question, no conditioning), which then builds as it always did."""
    streams = hparams.get("streams")
    if streams is not None and (
        not isinstance(streams, list | tuple) or not all(isinstance(s, str) for s in streams)
    ):
        raise CheckpointError(f"{where}: streams must be a list of names, got {streams!r}")
    vocab = hparams.get("conditioning_vocab")
    if vocab is not None and (
        not isinstance(vocab, Mapping)
        or not all(isinstance(values, list | tuple) for values in vocab.values())
    ):
        raise CheckpointError(f"{where}: conditioning_vocab must map each field to its values")
    return data_model_args(streams, vocab)


def load_weights(model: VQAModel, state: Mapping[str, Tensor], where: str) -> None:
    """``model.load_state_dict(state)``, explaining a mismatch instead of listing raw keys.

    Fusion weights saved under a block's older parameter names are renamed first, so the key
    comparison below sees what ``load_state_dict`` would load."""
    state = upgrade_legacy_keys(model, state)
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    reshaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & state.keys())
        if state[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or reshaped):
        model.load_state_dict(state)
        return
    hints = []
    head_out = _head_outputs(state)
    num_answers = _head_outputs(expected)
    if head_out is not None and head_out != num_answers:
        hints.append(
            f"the answer head has {head_out} outputs but the answer vocabulary has "
            f"{num_answers} answers (weights and vocabulary come from different runs)"
        )
    if any(k.startswith(STREAM_AND_CONDITIONING_KEYS) for k in (*missing, *unexpected)):
        hints.append(
            "the weights were trained with other visual streams, visual_streams or conditioning "
            "fields than the model was built with (the checkpoint records its streams and "
            "conditioning_vocab in its hyper-parameters)"
        )
    if any(k.startswith("fusion.") for k in (*missing, *unexpected)):
        hints.append(
            "the fusion weights belong to another fusion block than the config's "
            f"{type(model.fusion).__name__} (or another version of it)"
        )
    details = [
        f"{len(items)} {label} (e.g. {', '.join(items[:MAX_KEYS_SHOWN])})"
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("with another shape", reshaped),
        )
        if items
    ]
    raise CheckpointError(
        f"{where}: the weights do not fit the model its config describes"
        + (f": {'; '.join(hints)}" if hints else "")
        + f". Parameters: {'; '.join(details)}"
    )


def _head_outputs(state: Mapping[str, Tensor]) -> int | None:
    """Rows of the answer head's last weight matrix (= number of answers)."""
    weights = [v for k, v in state.items() if k.startswith("head.") and k.endswith("weight")]
    matrices = [w for w in weights if w.ndim == 2]
    return int(matrices[-1].shape[0]) if matrices else None


def text_vocab_size(state: Mapping[str, Tensor]) -> int | None:
    """Rows of the trained word embedding: a hub model may have more than its tokenizer."""
    rows = [
        int(v.shape[0])
        for k, v in state.items()
        if k.startswith("text.") and k.endswith("word_embeddings.weight")
    ]
    return rows[0] if rows else None


def load_checkpoint(path: str | Path) -> TrainedModel:
    """The model (eval mode, CPU), answer vocabulary and tokenizer of a training checkpoint."""
    path = Path(path)
    checkpoint = read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters")
    state_dict = checkpoint.get("state_dict")
    if not isinstance(hparams, dict) or not isinstance(state_dict, dict):
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint of this framework (no hyper_parameters / "
            "state_dict); pass a .ckpt written by `python train.py`"
        )
    if missing := [k for k in REQUIRED_HPARAMS if k not in hparams]:
        raise CheckpointError(
            f"{path}: hyper_parameters lack {missing}; it was not written by this framework's "
            "VQALitModule (or by an older version that did not store them)"
        )
    try:
        vocab, tokenizer = artifacts_from_dict(hparams["data_artifacts"])
    except (KeyError, TypeError, ValueError, OSError) as err:
        raise CheckpointError(
            f"{path}: unreadable data_artifacts (vocabulary/tokenizer): {err}"
        ) from err
    if list(vocab.answers) != list(hparams["answer_vocab"]):
        raise CheckpointError(
            f"{path}: answer_vocab ({len(hparams['answer_vocab'])} answers) and data_artifacts "
            f"({len(vocab)} answers) disagree; the checkpoint was edited or mixed from two runs"
        )
    run_config = hparams["run_config"]
    state = {k[len(NET_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(NET_PREFIX)}
    if not state:
        raise CheckpointError(f"{path}: state_dict has no '{NET_PREFIX}*' weights")
    if not isinstance(run_config, dict) or not isinstance(run_config.get("model"), dict):
        raise CheckpointError(f"{path}: run_config has no 'model' section to rebuild from")
    check_targets(run_config.get("data"), DATA_TARGET_PREFIX, f"{path}: data config")
    model = build_model(
        run_config["model"],
        num_answers=len(vocab),
        vocab_size=text_vocab_size(state) or len(tokenizer),
        where=f"{path}: model config",
        **recorded_model_args(hparams, str(path)),
    )
    load_weights(model, state, str(path))
    model.eval()
    return TrainedModel(
        model=model,
        answer_vocab=vocab,
        tokenizer=tokenizer,
        run_config=run_config,
        hparams=hparams,
        path=path,
    )
