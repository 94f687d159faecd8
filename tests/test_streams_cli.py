"""Several images per question and conditioning labels after training: prediction
(`vqa.inference.Predictor`, `python -m vqa.cli.predict`), evaluation (`python -m vqa.cli.eval`),
export (ONNX, safetensors), the attention figure, the data check and the demo's refusal.

The checkpoint is built, not trained: `vqa.cli.train.build_components` on a tiny hand-written
pair set (streams `left`/`right`, a `quadrant` label), saved as Lightning saves it. Its random
weights are enough: every check compares two ways of computing the same thing.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import pytorch_lightning as pl
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from tests.helpers import CONFIG_DIR, TINY_OVERRIDES, compose_config
from vqa.checkpoint import TrainedModel, build_model, load_checkpoint, recorded_model_args
from vqa.cli import eval as vqa_eval
from vqa.cli import predict as vqa_predict
from vqa.cli.eval import evaluate_checkpoint, resolve_data_config
from vqa.cli.export import (
    ONNX_FILE,
    LogitsModel,
    export_checkpoint,
    export_inputs,
    export_onnx,
    input_names,
    load_safetensors_export,
)
from vqa.cli.train import build_components
from vqa.data import check
from vqa.data.layout import split_layout
from vqa.inference import InputError, Predictor
from vqa.models.streams import StreamEncoders
from vqa.plots import plot_attention

STREAMS = ["left", "right"]
IMAGE_SIZE = 64  # through ResNet-18 up to layer3: a 4x4 attention grid
GRID = (4, 4)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
# split -> (first image id, each question's quadrant: two questions per pair, None = no label).
# val2014 has a label training never saw ("centre") and questions without one.
SPLITS = {
    "train2014": (0, ["top left", "top right", "bottom left", None] * 3),
    "val2014": (100, ["top left", "centre", None, "centre", "top right", "top left"]),
}
UNKNOWN_IN_VAL = 3  # "centre" twice, no label once
QUESTIONS = (
    "what color is the shape in the left image?",
    "what color is the shape in the right image?",
)


@dataclass(frozen=True)
class PairRun:
    ckpt: Path
    root: Path

    def image(self, split: str, image_id: int) -> Path:
        return split_layout(self.root, split).image_path(image_id)

    def pair(self, first: int = 100) -> list[Path]:
        return [self.image("val2014", first), self.image("val2014", first + 1)]


def write_split(root: Path, split: str) -> None:
    """Pair p shows images base + 2p (left) and base + 2p + 1 (right): one coloured square each."""
    base, quadrants = SPLITS[split]
    layout = split_layout(root, split)
    layout.image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(base)
    questions, annotations = [], []
    for n, quadrant in enumerate(quadrants):
        left, right = base + n // 2 * 2, base + n // 2 * 2 + 1
        colour = {}
        for image_id in (left, right):
            colour[image_id] = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (240, 240, 240))
            x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE - 24, 2))
            ImageDraw.Draw(image).rectangle([x, y, x + 20, y + 20], fill=COLOURS[colour[image_id]])
            image.save(layout.image_path(image_id), format="PNG")  # exact pixels
        record = {
            "question_id": base * 10 + n,
            "image_id": left,
            "image_ids": {"left": left, "right": right},
            "question": QUESTIONS[n % 2],
        }
        if quadrant is not None:
            record["quadrant"] = quadrant
        questions.append(record)
        answer = colour[(left, right)[n % 2]]
        annotations.append(
            {
                "question_id": base * 10 + n,
                "image_id": left,
                "question_type": "what color is the",
                "answer_type": "other",
                "multiple_choice_answer": answer,
                "answers": [
                    {"answer": answer, "answer_confidence": "yes", "answer_id": i + 1}
                    for i in range(10)
                ],
            }
        )
    layout.questions.parent.mkdir(parents=True, exist_ok=True)
    layout.annotations.parent.mkdir(parents=True, exist_ok=True)
    layout.questions.write_text(json.dumps({"questions": questions}))
    layout.annotations.write_text(json.dumps({"annotations": annotations}))


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory: pytest.TempPathFactory) -> PairRun:
    """A two-stream, one-field checkpoint as the train CLI would write it (before any step)."""
    base = tmp_path_factory.mktemp("pair_run")
    root = base / "pairs"
    for split in SPLITS:
        write_split(root, split)
    cfg = compose_config(
        "train",
        [
            *TINY_OVERRIDES,
            "data=vqav2",
            f"data.root={root}",
            "data.test_split=val2014",
            f"data.image_size={IMAGE_SIZE}",
            "data.min_answer_count=1",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.persistent_workers=false",
            "data.pin_memory=false",
            f"data.streams=[{','.join(STREAMS)}]",
            "data.conditioning_fields=[quadrant]",
            "model.visual.stages=[layer3]",
        ],
        base / "run",
        base / "data",
    )
    GlobalHydra.instance().clear()
    pl.seed_everything(0, verbose=False)
    _, module = build_components(cfg)
    ckpt = base / "pair.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, ckpt)
    return PairRun(ckpt, root)


@pytest.fixture(scope="module")
def trained(pair_run: PairRun) -> TrainedModel:
    return load_checkpoint(pair_run.ckpt)


@pytest.fixture(scope="module")
def predictor(trained: TrainedModel) -> Predictor:
    return Predictor(trained, cache_size=0)


def direct_logits(predictor: Predictor, images, question: str, labels) -> torch.Tensor:
    """``VQAModel.forward`` on the predictor's batch: the reference for its cached path."""
    batch = predictor.encode([images], [question], [labels])
    with torch.inference_mode():
        return predictor.model(**batch.model_inputs()).logits[0]


# ------------------------------------------------------------------------------ prediction


def test_two_images_answer_as_the_model_does_on_the_same_batch(
    pair_run: PairRun, predictor: Predictor
) -> None:
    assert predictor.streams == STREAMS and predictor.conditioning_fields == ["quadrant"]
    images, labels = pair_run.pair(), {"quadrant": "top right"}
    batch = predictor.encode([images], [QUESTIONS[0]], [labels])
    assert batch.image_index.tolist() == [[0, 1]]
    vocab = predictor.trained.conditioning_vocab["quadrant"]
    assert batch.conditioning_ids.tolist() == [[1 + vocab.index("top right")]]

    prediction = predictor.predict(images, QUESTIONS[0], conditioning=labels)
    direct = direct_logits(predictor, images, QUESTIONS[0], labels)
    logits = predictor.run([images], [QUESTIONS[0]], [labels]).output.logits[0]
    torch.testing.assert_close(logits, direct, atol=1e-5, rtol=1e-5)
    assert len(prediction.answers) == len(COLOURS)  # top 5 of the 3 answers: all of them
    best = direct.topk(len(COLOURS))
    answers = predictor.trained.answer_vocab
    assert [a for a, _ in prediction.answers] == [answers.decode(i) for i in best.indices]
    assert [s for _, s in prediction.answers] == pytest.approx(best.values.sigmoid().tolist())
    assert prediction.streams == STREAMS and prediction.conditioning == labels
    assert set(prediction.attention) == {
        f"{kind}/{s}" for kind in ("image", "question") for s in STREAMS
    }
    assert prediction.attention["image/right"].shape == GRID
    # images by stream name, in any order, are the same question
    named = predictor.predict(
        dict(reversed(list(zip(STREAMS, images, strict=True)))), QUESTIONS[0], conditioning=labels
    )
    assert named.answers == prediction.answers


def test_swapping_the_two_images_changes_the_logits(
    pair_run: PairRun, predictor: Predictor
) -> None:
    left, right = pair_run.pair()
    labels = [{"quadrant": "top left"}] * 2
    logits = predictor.run([[left, right], [right, left]], list(QUESTIONS[:1]) * 2, labels)
    first, swapped = logits.output.logits
    assert not torch.allclose(first, swapped, atol=1e-4)
    torch.testing.assert_close(
        swapped,
        direct_logits(predictor, [right, left], QUESTIONS[0], labels[0]),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (
            lambda p: p[:1],
            "reads 2 image(s) per question, one per stream ('left', 'right', in that order), got 1",
        ),
        (
            lambda p: p[0],
            "reads 2 image(s) per question, one per stream ('left', 'right', in that order), got one",
        ),
        (lambda p: [*p, p[0]], "got 3"),
        (lambda p: {"left": p[0]}, "reads the images 'left', 'right'; missing 'right'"),
        (lambda p: {"left": p[0], "right": p[1], "up": p[0]}, "unexpected 'up'"),
        (lambda p: [p[0], p[0].with_name("missing.jpg")], "the right image: image not found"),
    ],
)
def test_images_that_do_not_fit_the_streams_are_input_errors(
    pair_run: PairRun, predictor: Predictor, images, message: str
) -> None:
    with pytest.raises(InputError, match=re.escape(message)):
        predictor.predict(images(pair_run.pair()), QUESTIONS[0])


def test_labels_of_a_field_the_model_lacks_are_input_errors(
    pair_run: PairRun, predictor: Predictor
) -> None:
    with pytest.raises(InputError, match=r"unknown conditioning field\(s\) \['quadrnt'\]"):
        predictor.predict(pair_run.pair(), QUESTIONS[0], conditioning={"quadrnt": "top left"})
    with pytest.raises(InputError, match="quadrant label must be text"):
        predictor.predict(pair_run.pair(), QUESTIONS[0], conditioning={"quadrant": 3})


def test_an_unseen_label_is_the_unknown_row_with_a_warning(
    pair_run: PairRun, predictor: Predictor, caplog: pytest.LogCaptureFixture
) -> None:
    images = pair_run.pair()
    with caplog.at_level(logging.WARNING, logger="vqa.data.preprocess"):
        unseen = predictor.run([images], [QUESTIONS[1]], [{"quadrant": "centre"}])
    warnings = [r.getMessage() for r in caplog.records if "quadrant" in r.getMessage()]
    assert len(warnings) == 1 and "'centre'" in warnings[0] and "unknown" in warnings[0]
    batch = predictor.encode([images], [QUESTIONS[1]], [{"quadrant": "centre"}])
    assert batch.conditioning_ids.tolist() == [[0]]
    unlabelled = predictor.run([images], [QUESTIONS[1]]).output.logits
    torch.testing.assert_close(unseen.output.logits, unlabelled, atol=0, rtol=0)
    known = predictor.run([images], [QUESTIONS[1]], [{"quadrant": "top left"}]).output.logits
    assert not torch.allclose(unseen.output.logits, known, atol=1e-6)


def test_the_feature_cache_serves_each_image_of_a_pair(
    pair_run: PairRun, trained: TrainedModel, predictor: Predictor
) -> None:
    cached = Predictor(trained, cache_size=8)
    (a, b), (c, _) = pair_run.pair(100), pair_run.pair(102)
    calls = [([a, b], False), ([a, b], True), ([a, c], False), ([c, a], True)]
    for images, hit in calls:
        got = cached.predict(images, QUESTIONS[1], conditioning={"quadrant": "top left"})
        want = predictor.predict(images, QUESTIONS[1], conditioning={"quadrant": "top left"})
        assert got.image_cached is hit
        assert got.answers == want.answers
    # one entry per distinct image: one block prepares every stream's images (the default
    # model.stream_fusion=shared), and the labels act on the question, not on the maps
    assert cached.cache_stats().size == 3 and cached.cache_stats().hits > 0


# ------------------------------------------------------------------------------ figure, CLI


def test_the_attention_figure_has_one_panel_per_stream_image(
    pair_run: PairRun, predictor: Predictor
) -> None:
    images = pair_run.pair()
    prediction = predictor.predict(images, QUESTIONS[0], conditioning={"quadrant": "top left"})
    figure = plot_attention(images, prediction)
    image_axes = [ax for ax in figure.axes if ax.get_title().startswith("image/")]
    assert [ax.get_title().split(":")[0] for ax in image_axes] == ["image/left", "image/right"]
    assert all("4x4 grid" in ax.get_title() for ax in image_axes)
    # each stream's panel shows that stream's picture
    for ax, path in zip(image_axes, images, strict=True):
        with Image.open(path) as picture:
            assert np.array_equal(
                ax.get_images()[0].get_array(), np.asarray(picture.convert("RGB"))
            )
    question_titles = [ax.get_title(loc="left").split(":")[0] for ax in figure.axes]
    assert [t for t in question_titles if t] == ["question/left", "question/right"]
    assert "[quadrant: top left]" in figure.get_suptitle()
    with pytest.raises(ValueError, match="2 image"):
        plot_attention(images[0], prediction)


def run_predict_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *overrides: str) -> None:
    argv = ["vqa.cli.predict", *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    monkeypatch.setattr(sys, "argv", argv)
    GlobalHydra.instance().clear()
    try:
        vqa_predict.main()
    finally:
        GlobalHydra.instance().clear()


def test_predict_cli_takes_a_list_of_images_and_labels(
    pair_run: PairRun,
    predictor: Predictor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    left, right = pair_run.pair()
    out = tmp_path / "attention.png"
    run_predict_cli(
        monkeypatch,
        tmp_path,
        f"ckpt_path={pair_run.ckpt}",
        f"image=[{left},{right}]",
        f"question={QUESTIONS[0]}",
        "conditioning.quadrant=top left",
        f"save_attention={out}",
    )
    printed = " ".join(capsys.readouterr().out.split())  # the title may wrap
    expected = predictor.predict([left, right], QUESTIONS[0], conditioning={"quadrant": "top left"})
    assert "[quadrant: top left]" in printed and expected.answer in printed
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width > png.height  # two image panels side by side

    with pytest.raises(SystemExit) as exit_info:
        run_predict_cli(
            monkeypatch, tmp_path, f"ckpt_path={pair_run.ckpt}", f"image={left}", "question=what?"
        )
    assert exit_info.value.code == vqa_predict.EXIT_BAD_INPUT
    assert "reads 2 image(s) per question" in capsys.readouterr().err


# ------------------------------------------------------------------------------ evaluation


def test_eval_counts_the_questions_with_unseen_labels(
    pair_run: PairRun,
    predictor: Predictor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    argv = [
        "vqa.cli.eval",
        f"ckpt_path={pair_run.ckpt}",
        "split=val2014",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.num_workers=0",
        "callbacks=none",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    GlobalHydra.instance().clear()
    vqa_eval.main()
    GlobalHydra.instance().clear()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["unknown_conditioning"] == {"quadrant": UNKNOWN_IN_VAL}
    assert f"quadrant {UNKNOWN_IN_VAL}" in capsys.readouterr().out
    # evaluation's batches and the predictor's raw inputs give the same answers
    results = json.loads((tmp_path / "run" / metrics["results_file"]).read_text())
    records = json.loads(split_layout(pair_run.root, "val2014").questions.read_text())["questions"]
    assert len(results) == len(records)
    answers = {r["question_id"]: r["answer"] for r in results}
    for record in records:
        images = [pair_run.image("val2014", record["image_ids"][s]) for s in STREAMS]
        labels = {"quadrant": record.get("quadrant")}
        assert (
            predictor.predict(images, record["question"], conditioning=labels).answer
            == (answers[record["question_id"]])
        )


def test_eval_reads_the_checkpoints_streams_and_fields(trained: TrainedModel) -> None:
    data = resolve_data_config(trained, {})
    assert data["streams"] == STREAMS and data["conditioning_fields"] == ["quadrant"]
    swapped = {**trained.data_config, "streams": None, "conditioning_fields": None}
    data = resolve_data_config(trained, swapped)  # a data group of its own (it has a _target_)
    assert data["streams"] == STREAMS and data["conditioning_fields"] == ["quadrant"]
    with pytest.raises(ValueError, match=r"data.streams=\['right'\].*trained with streams"):
        resolve_data_config(trained, {"streams": ["right"]})
    with pytest.raises(ValueError, match="conditioning_fields"):
        resolve_data_config(trained, {"conditioning_fields": ["colour"]})


def test_evaluate_checkpoint_counts_unlabelled_questions_too(
    pair_run: PairRun, tmp_path: Path
) -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    data = {"num_workers": 0, "cache_dir": str(tmp_path / "cache")}
    outcome = evaluate_checkpoint(pair_run.ckpt, trainer, tmp_path, data=data, split="train2014")
    # train2014's unlabelled questions are unknown; its labels all are in the vocabulary
    assert outcome.unknown_conditioning == {"quadrant": 3}
    assert outcome.num_questions == len(SPLITS["train2014"][1])


# ------------------------------------------------------------------------------ export


def test_onnx_export_of_a_stream_model_matches_pytorch(
    pair_run: PairRun, trained: TrainedModel, predictor: Predictor, tmp_path: Path
) -> None:
    summary = export_checkpoint(pair_run.ckpt, tmp_path, "onnx")
    assert summary["max_abs_diff"] <= 1e-4
    names = list(input_names(trained.model))
    assert names == ["images", "input_ids", "attention_mask", "image_index", "conditioning_ids"]
    graph = onnx.load(str(tmp_path / ONNX_FILE)).graph
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in graph.input
    }
    assert dims["images"] == ["images", 3, IMAGE_SIZE, IMAGE_SIZE]
    assert dims["image_index"] == ["batch", 2] and dims["conditioning_ids"] == ["batch", 1]
    # batch 3 (traced with 2), two distinct images shared by all questions, mixed labels
    left, right = pair_run.pair()
    batch = predictor.encode(
        [[left, right], [right, left], [left, right]],
        [QUESTIONS[0], QUESTIONS[1], "what color is it?"],
        [{"quadrant": "top left"}, {"quadrant": None}, {"quadrant": "bottom left"}],
    )
    images, ids, mask, _, labels = export_inputs(batch)
    inputs = (images[:2], ids, mask, torch.tensor([[0, 1], [1, 0], [0, 1]]), labels)
    with torch.inference_mode():
        expected = LogitsModel(trained.model)(*inputs).numpy()
        np.testing.assert_allclose(
            expected, predictor.forward(batch).logits.numpy(), atol=1e-5, rtol=0
        )
    session = onnxruntime.InferenceSession(
        str(tmp_path / ONNX_FILE), providers=["CPUExecutionProvider"]
    )
    (got,) = session.run(None, {n: x.numpy() for n, x in zip(names, inputs, strict=True)})
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    config = json.loads((tmp_path / "export_config.json").read_text())
    assert config["inputs"]["image_index"]["streams"] == STREAMS
    assert config["inputs"]["conditioning_ids"]["vocabulary"] == trained.conditioning_vocab


def variant(trained: TrainedModel, **model_options: str) -> TrainedModel:
    """``trained`` rebuilt with other model options (random weights, seeded): the predictor
    and the export must follow every way of combining streams and injecting labels."""
    config = copy.deepcopy(trained.run_config)
    config["model"].update(model_options)
    config["model"]["combiner"] = OmegaConf.to_container(
        OmegaConf.load(CONFIG_DIR / "combiner" / "attention.yaml")
    )
    torch.manual_seed(0)
    model = build_model(
        config["model"],
        len(trained.answer_vocab),
        len(trained.tokenizer),
        **recorded_model_args(trained.hparams),
    )
    return dataclasses.replace(trained, model=model.eval(), run_config=config)


def test_separate_encoders_and_question_labels_predict_and_export(
    pair_run: PairRun, trained: TrainedModel, tmp_path: Path
) -> None:
    other = variant(trained, visual_streams="separate", conditioning_inject="question")
    assert isinstance(other.model.visual, StreamEncoders)
    cached = Predictor(other, cache_size=8)
    images, labels = pair_run.pair(), {"quadrant": "bottom left"}
    for hit in (False, True):  # the second time from the cache: one entry per stream
        prediction = cached.predict(images, QUESTIONS[1], conditioning=labels)
        assert prediction.image_cached is hit
        torch.testing.assert_close(
            cached.run([images], [QUESTIONS[1]], [labels]).output.logits[0],
            direct_logits(cached, images, QUESTIONS[1], labels),
            atol=1e-5,
            rtol=1e-5,
        )
    assert cached.cache_stats().size == 2
    assert export_onnx(other, tmp_path / ONNX_FILE) <= 1e-4


def test_safetensors_export_rebuilds_the_stream_model(
    pair_run: PairRun, trained: TrainedModel, predictor: Predictor, tmp_path: Path
) -> None:
    export_checkpoint(pair_run.ckpt, tmp_path, "safetensors")
    loaded = Predictor(load_safetensors_export(tmp_path), cache_size=0)
    assert (
        loaded.streams == STREAMS
        and loaded.trained.conditioning_vocab == trained.conditioning_vocab
    )
    images, labels = pair_run.pair(), {"quadrant": "top right"}
    assert loaded.predict(images, QUESTIONS[0], conditioning=labels).answers == (
        predictor.predict(images, QUESTIONS[0], conditioning=labels).answers
    )


# ------------------------------------------------------------------------------ data, demo


def test_data_check_decodes_every_streams_images(
    pair_run: PairRun, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert check.main([str(pair_run.root), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "streams left, right" in out
    report = check.check_split(pair_run.root, "val2014", workers=1, progress=False)
    assert report.streams == STREAMS and report.images == 6 and not report.problems.total
    # a right image that is not an image is found, though no question's image_id names it
    pair_run.image("val2014", 101).rename(tmp_path / "kept.jpg")
    try:
        pair_run.image("val2014", 101).write_bytes(b"not an image")
        broken = check.check_split(pair_run.root, "val2014", workers=1, progress=False)
        assert broken.problems.counts == {"corrupt_image": 1}
        only_left = check.check_split(pair_run.root, "val2014", 1, False, streams=["left"])
        assert only_left.images == 3 and not only_left.problems.total
    finally:
        (tmp_path / "kept.jpg").replace(pair_run.image("val2014", 101))


def test_the_demo_refuses_a_checkpoint_of_several_images(predictor: Predictor) -> None:
    demo = pytest.importorskip("vqa.demo", reason="the demo needs the `demo` extra (gradio)")
    with pytest.raises(demo.CheckpointError, match="reads 2 images per question"):
        demo.DemoApp(predictor)
