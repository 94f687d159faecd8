"""Export (`python -m vqa.cli.export`): ONNX parity with onnxruntime on new batch sizes and question
lengths, the safetensors round trip, and the files a consumer needs."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from tests.tiny_checkpoint import IMAGE_SIZE, TinyRun
from vqa.checkpoint import TrainedModel, build_model, load_checkpoint
from vqa.cli import export as vqa_export
from vqa.cli.export import (
    CONFIG_FILE,
    INPUT_NAMES,
    MIN_QUESTION_TOKENS,
    ONNX_FILE,
    ExportError,
    LogitsModel,
    check_onnx,
    example_inputs,
    export_checkpoint,
    export_inputs,
    export_onnx,
    load_safetensors_export,
)
from vqa.data.preprocess import Preprocessor
from vqa.utils.project import CONFIG_DIR

TOP_K_FUSIONS = ["parallel", "alternating", "multihead", "cot", "hierarchical"]
# Longer than the traced example and than k=32: a k or a length baked in at tracing would show.
LONG_QUESTION_TOKENS = 40


@pytest.fixture(scope="module")
def trained(run: TinyRun) -> TrainedModel:
    return load_checkpoint(run.ckpt)


@pytest.fixture(scope="module")
def onnx_dir(run: TinyRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m vqa.cli.export ckpt_path=... format=onnx`, through Hydra in process."""
    out = tmp_path_factory.mktemp("onnx")
    argv = ["vqa.cli.export", f"ckpt_path={run.ckpt}", "format=onnx", f"output_dir={out}"]
    argv.append(f"hydra.run.dir={out / 'hydra'}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", argv)
        GlobalHydra.instance().clear()
        vqa_export.main()
        GlobalHydra.instance().clear()
    return out


def real_inputs(run: TinyRun, trained: TrainedModel, count: int) -> dict[str, torch.Tensor]:
    """Preprocessed val questions, as a serving client would send them."""
    questions = run.questions("val2014")[:count]
    batch = Preprocessor.for_model(trained).batch(
        [run.image("val2014", q["image_id"]) for q in questions], [q["question"] for q in questions]
    )
    return dict(zip(INPUT_NAMES, export_inputs(batch), strict=True))


def test_onnx_matches_pytorch_on_other_batch_and_sequence_sizes(
    run: TinyRun, trained: TrainedModel, onnx_dir: Path
) -> None:
    session = onnxruntime.InferenceSession(
        str(onnx_dir / ONNX_FILE), providers=["CPUExecutionProvider"]
    )
    assert [i.name for i in session.get_inputs()] == ["images", "input_ids", "attention_mask"]
    # traced with batch 2 at the full question length: vary both
    for count, pad_to in ((5, None), (1, None), (3, trained.max_question_length)):
        inputs = real_inputs(run, trained, count)
        if pad_to is not None:
            extra = pad_to - inputs["input_ids"].shape[1]
            inputs["input_ids"] = torch.nn.functional.pad(
                inputs["input_ids"], (0, extra), value=trained.tokenizer.pad_token_id
            )
            inputs["attention_mask"] = torch.nn.functional.pad(inputs["attention_mask"], (0, extra))
        with torch.inference_mode():
            expected = trained.model(**inputs).logits.numpy()
        (got,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        assert got.shape == (count, len(trained.answer_vocab))
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_onnx_graph_declares_dynamic_batch_and_sequence(onnx_dir: Path) -> None:
    graph = onnx.load(str(onnx_dir / ONNX_FILE)).graph
    dims = {
        value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        for value in [*graph.input, *graph.output]
    }
    assert dims["images"] == ["batch", 3, IMAGE_SIZE, IMAGE_SIZE]
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"] == ["batch", "sequence"]
    assert dims["logits"][0] == "batch"


def test_onnx_export_ships_what_a_consumer_needs(trained: TrainedModel, onnx_dir: Path) -> None:
    config = json.loads((onnx_dir / CONFIG_FILE).read_text())
    assert config["model_file"] == ONNX_FILE
    assert config["scores"] == "sigmoid"
    assert config["max_question_length"] == trained.max_question_length
    assert config["inputs"]["images"]["shape"] == ["batch", 3, IMAGE_SIZE, IMAGE_SIZE]
    answers = json.loads((onnx_dir / "answer_vocab.json").read_text())["answers"]
    assert answers == trained.answer_vocab.answers
    assert (onnx_dir / "tokenizer" / "tokenizer.json").is_file()


def test_check_onnx_catches_a_model_that_differs(trained: TrainedModel, onnx_dir: Path) -> None:
    """The export's own parity check fails when PyTorch and the graph disagree."""
    assert check_onnx(trained, onnx_dir / ONNX_FILE) <= 1e-4
    other = load_checkpoint(trained.path)
    with torch.no_grad():
        list(other.model.head.parameters())[-1].add_(1e-2)  # the answer logits' bias
    with pytest.raises(ExportError, match="differ by"):
        check_onnx(dataclasses.replace(trained, model=other.model), onnx_dir / ONNX_FILE)


def test_safetensors_round_trip(run: TinyRun, trained: TrainedModel, tmp_path: Path) -> None:
    summary = export_checkpoint(run.ckpt, tmp_path, "safetensors")
    assert Path(summary["model_file"]).suffix == ".safetensors"
    loaded = load_safetensors_export(tmp_path)
    assert loaded.answer_vocab == trained.answer_vocab
    assert loaded.loss == trained.loss and loaded.image_size == trained.image_size
    for name, value in trained.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[name]), name
    inputs = real_inputs(run, trained, 3)
    with torch.inference_mode():
        torch.testing.assert_close(
            loaded.model(**inputs).logits, trained.model(**inputs).logits, atol=0, rtol=0
        )


def test_unknown_format(run: TinyRun, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format must be one of"):
        export_checkpoint(run.ckpt, tmp_path, "torchscript")


def with_fusion(trained: TrainedModel, fusion: str, **options) -> TrainedModel:
    """``trained`` with its fusion block replaced by ``configs/fusion/<fusion>.yaml`` + options
    (random weights: export parity does not need a trained block)."""
    config = copy.deepcopy(trained.run_config)
    block = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "fusion" / f"{fusion}.yaml"))
    block.update(hidden_dim=config["model"]["fusion"]["hidden_dim"], **options)
    config["model"]["fusion"] = block
    torch.manual_seed(0)
    model = build_model(config["model"], len(trained.answer_vocab), len(trained.tokenizer))
    return dataclasses.replace(trained, model=model.eval(), run_config=config)


@pytest.mark.parametrize("k", [4, 32])
@pytest.mark.parametrize("fusion", TOP_K_FUSIONS)
def test_top_k_fusion_exports_for_any_question_length(
    trained: TrainedModel, fusion: str, k: int, tmp_path: Path
) -> None:
    """k is clamped to each row's real keys inside the graph: a k above the export check's
    3-token question exports, and the graph keeps k words of a question longer than k."""
    sparse = with_fusion(trained, fusion, top_k=k, spatial_constraint=True)
    path = tmp_path / ONNX_FILE
    assert export_onnx(sparse, path) <= 1e-4  # its own check includes a 3-token question
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dense = with_fusion(trained, fusion, top_k=None, spatial_constraint=True)
    dense.model.load_state_dict(sparse.model.state_dict())
    for seq_len in (MIN_QUESTION_TOKENS, LONG_QUESTION_TOKENS):
        inputs = example_inputs(sparse, batch_size=3, seq_len=seq_len, seed=seq_len)
        with torch.inference_mode():
            expected = LogitsModel(sparse.model)(*inputs).numpy()
            unsparsified = LogitsModel(dense.model)(*inputs).numpy()
        (got,) = session.run(None, dict(zip(INPUT_NAMES, (x.numpy() for x in inputs), strict=True)))
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
        if seq_len > k:  # top-k bites on the question, so the check above is not vacuous
            assert not np.allclose(expected, unsparsified, atol=1e-4)
