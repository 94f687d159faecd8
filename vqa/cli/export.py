"""Export a trained checkpoint for serving: `python -m vqa.cli.export ckpt_path=... format=onnx|safetensors`.

``onnx``: ``model.onnx`` mapping (images [B,3,S,S] float, input_ids [B,N] int64, attention_mask
[B,N] int64) to logits [B,A], with dynamic batch and sequence axes (S is the checkpoint's image
size). The export is checked against PyTorch with onnxruntime on batch sizes and question
lengths other than the traced example before it is kept, because tracing bakes in any shape a
Python branch looked at. ``safetensors``: the model weights alone (no optimizer state, no
pickle), loadable with :func:`load_safetensors_export`. Both write beside the model what a
consumer needs: ``answer_vocab.json``, ``tokenizer/`` and ``export_config.json`` (the training
config, preprocessing, input/output names, how to turn logits into scores).
"""

from __future__ import annotations

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

from vqa.checkpoint import TrainedModel, build_model, load_checkpoint, load_weights, text_vocab_size
from vqa.data.artifacts import load_artifacts, save_artifacts
from vqa.data.batch import VQABatch
from vqa.data.images import IMAGENET_MEAN, IMAGENET_STD
from vqa.data.preprocess import Preprocessor
from vqa.inference import score_function
from vqa.utils import apply_extras, set_project_root
from vqa.utils.project import CONFIG_DIR

FORMATS = ("onnx", "safetensors")
INPUT_NAMES = ("images", "input_ids", "attention_mask")
OUTPUT_NAMES = ("logits",)
ONNX_FILE = "model.onnx"
SAFETENSORS_FILE = "model.safetensors"
CONFIG_FILE = "export_config.json"
EXPORT_VERSION = 1
# The shortest question the tokenizer can produce: [CLS] word [SEP].
MIN_QUESTION_TOKENS = 3


class ExportError(RuntimeError):
    """The exported model would not reproduce the PyTorch model."""


class LogitsModel(nn.Module):
    """The tensor-only signature an exporter can trace: attention maps are dropped.

    Its inputs are those of a batch with one image per question (:func:`export_inputs`), for
    which the model's ``image_index`` is the identity and can be left out.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(images=images, input_ids=input_ids, attention_mask=attention_mask).logits


def export_inputs(batch: VQABatch) -> tuple[Tensor, Tensor, Tensor]:
    """The exported graph's inputs (:data:`INPUT_NAMES` order) of a batch with one image per
    question, such as :class:`~vqa.data.preprocess.Preprocessor` makes."""
    if batch.images is None or not torch.equal(
        batch.image_index.cpu(), torch.arange(batch.num_questions)
    ):
        raise ValueError("the exported model takes images, one per question, in question order")
    return batch.images, batch.input_ids, batch.attention_mask


def example_inputs(
    trained: TrainedModel, batch_size: int, seq_len: int, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Random images and token ids, collated by the checkpoint's preprocessing; every other
    question is shorter than ``seq_len`` (down to the shortest), so masks are exercised."""
    generator = torch.Generator().manual_seed(seed)
    preprocessor = Preprocessor.for_model(trained)
    size = preprocessor.image_size
    images = torch.randn(batch_size, 3, size, size, generator=generator)
    ids = torch.randint(0, len(preprocessor.tokenizer), (batch_size, seq_len), generator=generator)
    lengths = [seq_len] * batch_size
    lengths[1::2] = [max(MIN_QUESTION_TOKENS, seq_len // 2)] * len(lengths[1::2])
    token_ids = [row[:length].tolist() for row, length in zip(ids, lengths, strict=True)]
    return export_inputs(preprocessor.collate(token_ids, images))


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
    dynamic = {
        "images": {0: "batch"},
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
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
            input_names=list(INPUT_NAMES),
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
    worst = 0.0
    for seed, (batch_size, seq_len) in enumerate(
        [(3, MIN_QUESTION_TOKENS + 2), (1, MIN_QUESTION_TOKENS), (4, trained.max_question_length)]
    ):
        inputs = example_inputs(trained, batch_size, seq_len, seed=seed + 1)
        with torch.inference_mode():
            expected = wrapper(*inputs).numpy()
        try:
            (got,) = session.run(
                None, dict(zip(INPUT_NAMES, (x.numpy() for x in inputs), strict=True))
            )
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
    return {
        "export_version": EXPORT_VERSION,
        "model_file": model_file,
        "checkpoint": str(trained.path),
        "inputs": {
            "images": {
                "shape": ["batch", 3, trained.image_size, trained.image_size],
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
