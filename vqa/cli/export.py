"""Export a trained checkpoint for serving: `python -m vqa.cli.export ckpt_path=... format=onnx|safetensors`.

``onnx``: ``model.onnx`` mapping (images [B,3,S,S] float, input_ids [B,N] int64, attention_mask
[B,N] int64) to logits [B,A], with dynamic batch and sequence axes (S is the checkpoint's image
size). A model of several visual streams (``data.streams``, K of them) also takes
``image_index`` [B,K] int64 (column k: the row of ``images`` [U,3,S,S] holding each question's
stream-k image; U, the distinct images, is its own dynamic axis), and a model trained with
conditioning fields (``data.conditioning_fields``, F of them) ``conditioning_ids`` [B,F] int64
(each label's index in the field's vocabulary, written to ``export_config.json``; 0 = unknown). The export is checked against PyTorch with onnxruntime on batch sizes and question
lengths other than the traced example before it is kept, because tracing bakes in any shape a
Python branch looked at. ``safetensors``: the model weights alone (no optimizer state, no
pickle), loadable with :func:`load_safetensors_export`. Both write beside the model what a
consumer needs: ``answer_vocab.json``, ``tokenizer/`` and ``export_config.json`` (the training
config, preprocessing, input/output names, how to turn logits into scores).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from rich.console import Console
from safetensors.torch import load_file, save_model
from torch import Tensor, nn

from vqa.checkpoint import (
    TrainedModel,
    build_model,
    load_checkpoint,
    load_weights,
    recorded_model_args,
    text_vocab_size,
)
from vqa.data.artifacts import load_artifacts, save_artifacts
from vqa.data.batch import VQABatch
from vqa.data.images import IMAGENET_MEAN, IMAGENET_STD
from vqa.inference import model_preprocessor, score_function
from vqa.utils import apply_extras, set_project_root
from vqa.utils.project import CONFIG_DIR

FORMATS = ("onnx", "safetensors")
INPUT_NAMES = ("images", "input_ids", "attention_mask")
# Inputs of a model of several visual streams, and of one with conditioning fields (in order).
STREAMS_INPUT = "image_index"
CONDITIONING_INPUT = "conditioning_ids"
OUTPUT_NAMES = ("logits",)
ONNX_FILE = "model.onnx"
SAFETENSORS_FILE = "model.safetensors"
CONFIG_FILE = "export_config.json"
EXPORT_VERSION = 1
# The shortest question the tokenizer can produce: [CLS] word [SEP].
MIN_QUESTION_TOKENS = 3


class ExportError(RuntimeError):
    """The exported model would not reproduce the PyTorch model."""


def input_names(model: nn.Module) -> tuple[str, ...]:
    """The exported graph's inputs, in order: :data:`INPUT_NAMES`, then ``image_index`` for a
    model of several visual streams and ``conditioning_ids`` for one with conditioning
    fields."""
    names = INPUT_NAMES
    if getattr(model, "num_streams", 1) > 1:
        names += (STREAMS_INPUT,)
    if getattr(model, "conditioning", None) is not None:
        names += (CONDITIONING_INPUT,)
    return names


class LogitsModel(nn.Module):
    """The tensor-only signature an exporter can trace: attention maps are dropped.

    Its inputs are those of :func:`export_inputs`, in :func:`input_names` order. With one image
    per question the model's ``image_index`` is the identity and is left out; a model of several
    visual streams takes it ([B, K]) after the question, and one with conditioning fields its
    ``conditioning_ids`` [B, F] last.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.extra_inputs = input_names(model)[len(INPUT_NAMES) :]

    def forward(
        self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, *extra: Tensor
    ) -> Tensor:
        inputs = dict(zip(self.extra_inputs, extra, strict=True))
        return self.model(
            images=images, input_ids=input_ids, attention_mask=attention_mask, **inputs
        ).logits


def export_inputs(batch: VQABatch) -> tuple[Tensor, ...]:
    """The exported graph's inputs (:func:`input_names` order) of a batch of images, such as
    :class:`~vqa.data.preprocess.Preprocessor` makes: one image per question, in question
    order, or (several visual streams) each question's row of each stream's image
    (``image_index`` [B, K]); then the questions' ``conditioning_ids`` where the batch has
    them."""
    if batch.images is None:
        raise ValueError("the exported model takes images, not cached visual features")
    inputs: tuple[Tensor, ...] = (batch.images, batch.input_ids, batch.attention_mask)
    if batch.image_index.dim() == 2:
        inputs += (batch.image_index,)
    elif not torch.equal(batch.image_index.cpu(), torch.arange(batch.num_questions)):
        raise ValueError("the exported model takes images, one per question, in question order")
    if batch.conditioning_ids is not None:
        inputs += (batch.conditioning_ids,)
    return inputs


def example_inputs(
    trained: TrainedModel, batch_size: int, seq_len: int, seed: int = 0
) -> tuple[Tensor, ...]:
    """Random images and token ids, collated by the checkpoint's preprocessing; every other
    question is shorter than ``seq_len`` (down to the shortest), so masks are exercised. A
    model of several visual streams gets K images per question; one with conditioning fields
    random label ids, the unknown (0) among them."""
    generator = torch.Generator().manual_seed(seed)
    # Labels are drawn as ids below: collating them from values would warn about unknown ones.
    preprocessor = dataclasses.replace(model_preprocessor(trained), conditioning_vocab=None)
    size = preprocessor.image_size
    streams = getattr(trained.model, "num_streams", 1)
    images = torch.randn(batch_size * streams, 3, size, size, generator=generator)
    ids = torch.randint(0, len(preprocessor.tokenizer), (batch_size, seq_len), generator=generator)
    lengths = [seq_len] * batch_size
    lengths[1::2] = [max(MIN_QUESTION_TOKENS, seq_len // 2)] * len(lengths[1::2])
    token_ids = [row[:length].tolist() for row, length in zip(ids, lengths, strict=True)]
    pixels = images if streams == 1 else [list(pair) for pair in images.split(streams)]
    batch = preprocessor.collate(token_ids, pixels)
    vocab = trained.conditioning_vocab
    if getattr(trained.model, "conditioning", None) is not None and vocab is not None:
        labels = [
            torch.randint(0, len(values) + 1, (batch_size,), generator=generator)
            for values in vocab.values()
        ]
        batch = dataclasses.replace(batch, conditioning_ids=torch.stack(labels, dim=1))
    return export_inputs(batch)


def export_onnx(
    trained: TrainedModel, path: str | Path, opset: int = 17, atol: float = 1e-4
) -> float:
    """Write ``path`` and return the largest |onnxruntime - PyTorch| logit difference found on
    shapes other than the traced one; raises :class:`ExportError` (and removes the file) above
    ``atol``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = LogitsModel(trained.model).eval()
    seq_len = trained.max_question_length
    names = input_names(trained.model)
    dynamic = {
        # with streams a batch's distinct images are not one per question: their own axis
        "images": {0: "images" if STREAMS_INPUT in names else "batch"},
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        **{name: {0: "batch"} for name in names[len(INPUT_NAMES) :]},
        "logits": {0: "batch"},
    }
    with warnings.catch_warnings():
        # Tracer warnings flag Python branches on shapes; the parity check below is the test.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The TorchScript exporter is chosen on purpose: the dynamo one needs onnxscript.
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based")
        torch.onnx.export(
            wrapper,
            example_inputs(trained, batch_size=2, seq_len=seq_len),
            str(path),
            dynamo=False,
            input_names=list(names),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic,
            opset_version=opset,
        )
    try:
        return check_onnx(trained, path, atol)
    except ExportError:
        path.unlink(missing_ok=True)
        raise


def check_onnx(trained: TrainedModel, path: str | Path, atol: float = 1e-4) -> float:
    """Max |onnxruntime - PyTorch| over batch sizes and question lengths unlike the example's
    (down to the shortest question); :class:`ExportError` if any exceeds ``atol``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapper = LogitsModel(trained.model).eval()
    names = input_names(trained.model)
    worst = 0.0
    for seed, (batch_size, seq_len) in enumerate(
        [(3, MIN_QUESTION_TOKENS + 2), (1, MIN_QUESTION_TOKENS), (4, trained.max_question_length)]
    ):
        inputs = example_inputs(trained, batch_size, seq_len, seed=seed + 1)
        with torch.inference_mode():
            expected = wrapper(*inputs).numpy()
        try:
            (got,) = session.run(None, dict(zip(names, (x.numpy() for x in inputs), strict=True)))
        except Exception as err:  # onnxruntime raises its own untyped Fail errors
            raise ExportError(
                f"the ONNX model fails on batch {batch_size}, {seq_len} tokens: {err}. Tracing "
                "baked in a shape a Python branch depends on (e.g. an int taken from a tensor's "
                "size); export with another fusion setting or report it."
            ) from err
        diff = float(np.abs(got - expected).max())
        worst = max(worst, diff)
        if not diff <= atol:
            raise ExportError(
                f"onnxruntime and PyTorch logits differ by {diff:.3g} (> {atol}) on batch "
                f"{batch_size}, {seq_len} tokens"
            )
    return worst


def export_safetensors(trained: TrainedModel, path: str | Path) -> Path:
    """The model's weights only; ``save_model`` also handles tensors shared between modules."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(trained.model, str(path), metadata={"format": "pt", "source": str(trained.path)})
    return path


def export_config(trained: TrainedModel, model_file: str) -> dict[str, Any]:
    """What a consumer needs to feed the model and read its output."""
    names = input_names(trained.model)
    config = {
        "export_version": EXPORT_VERSION,
        "model_file": model_file,
        "checkpoint": str(trained.path),
        "inputs": {
            "images": {
                "shape": [
                    "images" if STREAMS_INPUT in names else "batch",
                    3,
                    trained.image_size,
                    trained.image_size,
                ],
                "dtype": "float32",
                "preprocessing": "RGB, resized (not cropped) to image_size, scaled to [0, 1], "
                "normalised with mean/std",
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
            },
            "input_ids": {"shape": ["batch", "sequence"], "dtype": "int64"},
            "attention_mask": {"shape": ["batch", "sequence"], "dtype": "int64"},
        },
        "max_question_length": trained.max_question_length,
        "outputs": {"logits": {"shape": ["batch", len(trained.answer_vocab)]}},
        "scores": score_function(trained.loss),
        "hparams": {k: trained.hparams.get(k) for k in ("loss", "question_types")},
        "run_config": trained.run_config,
    }
    # What the model reads besides one image per question, and how (only where it does).
    streams, vocab = trained.streams, trained.conditioning_vocab
    if streams is not None:
        config["hparams"]["streams"] = streams
    if vocab is not None:
        config["hparams"]["conditioning_vocab"] = vocab
    if STREAMS_INPUT in names:
        config["inputs"][STREAMS_INPUT] = {
            "shape": ["batch", len(streams or ())],
            "dtype": "int64",
            "streams": streams,
            "meaning": "column k: the row of images holding the question's image of stream k "
            "(streams in this order); an image several questions or streams show may be one row",
        }
    if CONDITIONING_INPUT in names:
        config["inputs"][CONDITIONING_INPUT] = {
            "shape": ["batch", len(vocab or {})],
            "dtype": "int64",
            "fields": list(vocab or {}),
            "vocabulary": vocab,
            "meaning": "column f: the index of the question's label of field f, 1 + its "
            "position in the field's vocabulary; 0 = unknown (no label, or one never seen in "
            "training)",
        }
    return config


def export_checkpoint(
    ckpt_path: str | Path,
    output_dir: str | Path,
    fmt: str = "onnx",
    opset: int = 17,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Export ``ckpt_path`` into ``output_dir`` as ``fmt``; returns a summary of what was written."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    trained = load_checkpoint(ckpt_path)
    output_dir = Path(output_dir)
    summary: dict[str, Any] = {"format": fmt, "output_dir": str(output_dir)}
    if fmt == "onnx":
        model_file = output_dir / ONNX_FILE
        summary["max_abs_diff"] = export_onnx(trained, model_file, opset=opset, atol=atol)
    else:
        model_file = export_safetensors(trained, output_dir / SAFETENSORS_FILE)
    save_artifacts(output_dir, trained.answer_vocab, trained.tokenizer)
    config = export_config(trained, model_file.name)
    (output_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    summary["model_file"] = str(model_file)
    return summary


def load_safetensors_export(directory: str | Path) -> TrainedModel:
    """Rebuild the model of a ``format=safetensors`` export (the inverse of the export)."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    vocab, tokenizer = load_artifacts(directory)
    state = load_file(str(directory / config["model_file"]))
    model = build_model(
        config["run_config"]["model"],
        num_answers=len(vocab),
        vocab_size=text_vocab_size(state) or len(tokenizer),
        **recorded_model_args(config["hparams"], str(directory)),
    )
    load_weights(model, state, str(directory))
    return TrainedModel(
        model=model.eval(),
        answer_vocab=vocab,
        tokenizer=tokenizer,
        run_config=config["run_config"],
        hparams=config["hparams"],
        path=directory,
    )


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    apply_extras(cfg)
    summary = export_checkpoint(cfg.ckpt_path, cfg.output_dir, cfg.format, cfg.opset, cfg.atol)
    message = f"exported {cfg.ckpt_path} as {cfg.format}: {summary['model_file']}"
    if "max_abs_diff" in summary:
        message += f" (onnxruntime vs PyTorch: max |diff| {summary['max_abs_diff']:.2e})"
    Console().print(message)


set_project_root()

if __name__ == "__main__":
    main()
