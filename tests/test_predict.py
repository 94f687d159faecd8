"""Prediction on raw inputs (`vqa.inference.Predictor`, `python -m vqa.cli.predict`) and the
attention figure: the same token ids, batches and logits as training and evaluation."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from PIL import Image

from tests.tiny_checkpoint import GRID, TinyRun
from vqa.checkpoint import load_checkpoint
from vqa.cli import predict as vqa_predict
from vqa.cli.eval import build_datamodule
from vqa.data.datamodule import encode_batch
from vqa.inference import InputError, Predictor
from vqa.lit_module import VQALitModule
from vqa.plots import plot_attention


@pytest.fixture(scope="module")
def predictor(run: TinyRun) -> Predictor:
    return Predictor.from_checkpoint(run.ckpt)


def test_top5_answers_with_scores(run: TinyRun, predictor: Predictor) -> None:
    question = run.questions("val2014")[0]
    image = run.image("val2014", question["image_id"])
    prediction = predictor.predict(image, question["question"])

    assert len(prediction.answers) == 5
    answers, scores = zip(*prediction.answers, strict=True)
    assert len(set(answers)) == 5
    assert set(answers) <= set(predictor.trained.answer_vocab.answers)
    assert list(scores) == sorted(scores, reverse=True)
    assert all(0.0 < s < 1.0 for s in scores)
    # the scores are the sigmoids of the logits a plain forward pass gives
    batch = predictor.encode([image], [question["question"]])
    with torch.inference_mode():
        logits = predictor.model(**batch.model_inputs()).logits[0]
    best = logits.topk(5)
    vocab = predictor.trained.answer_vocab
    assert list(answers) == [vocab.decode(i) for i in best.indices.tolist()]
    assert scores == pytest.approx(best.values.sigmoid().tolist(), abs=1e-6)


def test_same_logits_as_the_evaluation_pipeline(run: TinyRun, predictor: Predictor) -> None:
    """Raw files through the predictor == the datamodule's batches (resize, normalisation,
    tokenisation and padding), so a prediction here is what evaluation scores."""
    trained = predictor.trained
    datamodule = build_datamodule(
        trained, {**trained.data_config, "num_workers": 0, "eval_batch_size": 6}, "val2014"
    )
    batch = next(iter(datamodule.predict_dataloader()))
    with torch.inference_mode():
        expected = trained.model(**batch.model_inputs()).logits
        ids = batch.image_id.tolist()
        got = predictor.forward(
            predictor.encode([run.image("val2014", i) for i in ids], batch.question)
        ).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_same_token_ids_as_the_datamodule(run: TinyRun, predictor: Predictor) -> None:
    """A question gets the ids training and evaluation encode it to ([CLS]/[SEP], truncation at
    max_question_length, right padding with the pad token, no token_type_ids), and an image the
    pixels of the evaluation transform."""
    trained = predictor.trained
    datamodule = build_datamodule(trained, {**trained.data_config, "num_workers": 0}, "val2014")
    dataset = datamodule.datasets["val2014"]
    rows = [dataset[i] for i in range(6)]
    batch = predictor.encode(
        [run.image("val2014", r["image_id"]) for r in rows], [r["question"] for r in rows]
    )
    for i, row in enumerate(rows):
        length = int(batch.attention_mask[i].sum())
        assert batch.input_ids[i, :length].tolist() == list(row["input_ids"])
        assert set(batch.input_ids[i, length:].tolist()) <= {trained.tokenizer.pad_token_id}
        assert torch.equal(batch.images[i], row["image"])  # the evaluation's transform
    # a question longer than max_question_length is refused by default; with
    # long_questions="truncate" it is truncated as the datamodule truncates it
    long_question = " ".join(["what color is the big shape left of the circle"] * 4)
    expected = encode_batch(
        [long_question],
        [[]],
        tokenizer=trained.tokenizer,
        vocab=trained.answer_vocab,
        max_length=trained.max_question_length,
    )["input_ids"][0]
    assert len(expected) == trained.max_question_length
    image = run.image("val2014", rows[0]["image_id"])
    with pytest.raises(InputError, match=f"reads at most {trained.max_question_length}"):
        predictor.encode([image], [long_question])
    truncating = Predictor(trained, long_questions="truncate")
    assert truncating.encode([image], [long_question]).input_ids[0].tolist() == expected
    prediction = truncating.predict(image, long_question)
    assert len(prediction.tokens) == trained.max_question_length
    assert prediction.tokens[-1] == "[SEP]"
    assert "token_type_ids" not in batch.model_inputs()


def test_same_logits_as_the_lit_module(run: TinyRun, predictor: Predictor) -> None:
    """The predictor and the LightningModule run the model the same way: equal logits on the
    same batch, and the predicted scores are the sigmoids of the module's logits."""
    trained = load_checkpoint(run.ckpt)  # separate weights, loaded the same way
    module = instantiate(trained.run_config["module"])(
        net=trained.model,
        answer_vocab=trained.answer_vocab.answers,
        question_types=trained.question_types,
    )
    assert isinstance(module, VQALitModule)
    module.eval()
    questions = run.questions("val2014")[:4]
    images = [run.image("val2014", q["image_id"]) for q in questions]
    texts = [q["question"] for q in questions]
    batch = predictor.encode(images, texts)
    with torch.inference_mode():
        expected = module(batch).logits
    torch.testing.assert_close(predictor.forward(batch).logits, expected, atol=0, rtol=0)
    # predict_batch encodes each image alone (a batch of one, what its cache holds) where the
    # module encodes the four together: convolutions then differ in the last bits
    for prediction, logits in zip(predictor.predict_batch(images, texts), expected, strict=True):
        best = logits.sigmoid().topk(len(prediction.answers))
        assert [a for a, _ in prediction.answers] == [
            trained.answer_vocab.decode(a) for a in best.indices.tolist()
        ]
        assert [s for _, s in prediction.answers] == pytest.approx(best.values.tolist(), abs=1e-6)
    # one question about one image: bit for bit
    alone = predictor.encode(images[:1], texts[:1])
    with torch.inference_mode():
        best = module(alone).logits[0].sigmoid().topk(5)
    assert predictor.predict(images[0], texts[0]).answers == [
        (trained.answer_vocab.decode(a), s)
        for a, s in zip(best.indices.tolist(), best.values.tolist(), strict=True)
    ]


def test_batch_of_mixed_lengths_equals_one_by_one(run: TinyRun, predictor: Predictor) -> None:
    questions = run.questions("val2014")[:4]
    images = [run.image("val2014", q["image_id"]) for q in questions]
    texts = [q["question"] for q in questions]
    assert len({len(t.split()) for t in texts}) > 1  # padding is really exercised
    batched = predictor.predict_batch(images, texts)
    for image, text, together in zip(images, texts, batched, strict=True):
        alone = predictor.predict(image, text)
        assert [a for a, _ in alone.answers] == [a for a, _ in together.answers]
        assert [s for _, s in alone.answers] == pytest.approx(
            [s for _, s in together.answers], abs=1e-5
        )
        assert alone.tokens == together.tokens
        for key, value in alone.attention.items():
            torch.testing.assert_close(value, together.attention[key], atol=1e-5, rtol=1e-5)


def test_attention_maps_are_distributions(run: TinyRun, predictor: Predictor) -> None:
    question = run.questions("val2014")[1]
    image = Image.open(run.image("val2014", question["image_id"]))  # a PIL image works too
    prediction = predictor.predict(image, question["question"])
    assert prediction.tokens[0] == "[CLS]" and prediction.tokens[-1] == "[SEP]"
    assert prediction.attention["image"].shape == GRID
    assert prediction.attention["question"].shape == (len(prediction.tokens),)
    for value in prediction.attention.values():
        assert value.min() >= 0
        assert float(value.sum()) == pytest.approx(1.0, abs=1e-5)


def test_cross_entropy_models_get_a_softmax(run: TinyRun) -> None:
    trained = load_checkpoint(run.ckpt)
    ce = Predictor(dataclasses.replace(trained, hparams={**trained.hparams, "loss": "ce"}))
    logits = torch.randn(3, len(trained.answer_vocab))
    torch.testing.assert_close(ce.scores(logits).sum(dim=1), torch.ones(3))
    torch.testing.assert_close(Predictor(trained).scores(logits), logits.sigmoid())


def test_cli_prints_answers_and_writes_the_attention_png(
    run: TinyRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    question = run.questions("val2014")[2]
    out = tmp_path / "figs" / "attention.png"
    argv = [
        "vqa.cli.predict",
        f"ckpt_path={run.ckpt}",
        f"image={run.image('val2014', question['image_id'])}",
        f"question={question['question']}",
        f"save_attention={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    GlobalHydra.instance().clear()
    vqa_predict.main()
    GlobalHydra.instance().clear()

    printed = capsys.readouterr().out
    assert question["question"].split()[0] in printed
    assert sum(line.strip().startswith(("│ 1", "│ 5")) for line in printed.splitlines()) == 2
    with Image.open(out) as png:
        assert png.format == "PNG"
        pixels = np.asarray(png.convert("RGB"), dtype=np.float32)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    # the heatmap colours the image: many distinct colours, not a blank canvas
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500


def test_figure_has_a_panel_per_attention_map(run: TinyRun, predictor: Predictor) -> None:
    """Multi-level fusions (hierarchical: word/phrase/sentence) get one panel per level."""
    question = run.questions("val2014")[3]
    image = run.image("val2014", question["image_id"])
    base = predictor.predict(image, question["question"])
    levels = ("word", "phrase", "sentence")
    attention = {f"image/{lv}": torch.rand(*GRID).softmax(0) for lv in levels}
    attention |= {f"question/{lv}": base.attention["question"] for lv in levels}
    figure = plot_attention(image, dataclasses.replace(base, attention=attention))
    titles = [ax.get_title() for ax in figure.axes] + [
        ax.get_title(loc="left") for ax in figure.axes
    ]
    # in the fusion block's order, each with how peaked it is
    image_titles = [t for t in titles if t.startswith("image/")]
    assert [t.split(":")[0] for t in image_titles] == [f"image/{lv}" for lv in levels]
    assert all(", peak " in t and "4x4 grid" in t for t in image_titles)
    question_titles = [t for t in titles if t.startswith("question/")]
    assert [t.split(":")[0] for t in question_titles] == [f"question/{lv}" for lv in levels]
    uniform_peak = float(base.attention["question"].max()) * len(base.tokens)
    assert all(t.endswith(f"peak {uniform_peak:.1f}x uniform") for t in question_titles)
    token_texts = [t.get_text() for ax in figure.axes for t in ax.texts]
    assert token_texts.count("[CLS]") == len(levels)


def test_bad_questions_are_refused_with_their_reason(run: TinyRun, predictor: Predictor) -> None:
    question = run.questions("val2014")[0]
    image = run.image("val2014", question["image_id"])
    limit = predictor.max_question_length
    cases = {
        "": "the question is empty",
        "   \t\n": "the question is empty",
        "\u200b": "the question has no words",  # nothing the tokenizer keeps
        " ".join(["what color is the circle"] * 4): (  # 20 words, each a token
            rf"too long: 22 tokens \(\[CLS\] and \[SEP\] included\), this model reads at most "
            rf"{limit}; shorten it by {22 - limit} token\(s\)"
        ),
    }
    before = predictor.cache_stats()
    for text, message in cases.items():
        with pytest.raises(InputError, match=message):
            predictor.predict(image, text)
    with pytest.raises(InputError, match="must be text, not NoneType"):
        predictor.predict(image, None)  # type: ignore[arg-type]
    # in a batch the message says which input; nothing reached the model
    with pytest.raises(InputError, match=r"^input 2 of 2: the question is empty$"):
        predictor.predict_batch([image, image], [question["question"], " "])
    assert predictor.cache_stats() == before
    # a question of exactly max_question_length tokens is answered
    words = ["what"] * (limit - 2)
    assert len(predictor.predict(image, " ".join(words)).tokens) == limit
    with pytest.raises(ValueError, match="long_questions"):
        Predictor(predictor.trained, long_questions="cut")  # type: ignore[arg-type]


def test_unreadable_images_are_refused_with_their_reason(
    run: TinyRun, predictor: Predictor, tmp_path: Path
) -> None:
    question = run.questions("val2014")[0]
    good = run.image("val2014", question["image_id"])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    cases = [
        (tmp_path / "missing.jpg", f"^image not found: {tmp_path / 'missing.jpg'}$"),
        (tmp_path, "is a folder, not an image file"),
        (text, f"^{text} cannot be read as an image: not an image format"),
        (truncated, f"^{truncated} cannot be read as an image: corrupt or truncated"),
        (b"\x89PNG\r\n\x1a\n garbage", "^the uploaded data cannot be read as an image"),
        (b"", "the image is empty"),
        (np.zeros((4, 4, 7), dtype=np.float64), "the image cannot be decoded"),
        (42, "^expected an image: .* not int$"),
    ]
    before = predictor.cache_stats()
    for image, message in cases:
        with pytest.raises(InputError, match=message) as info:
            predictor.predict(image, question["question"])
        assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(InputError, match=r"^input 2 of 2: image not found"):
        predictor.predict_batch([good, tmp_path / "gone.png"], ["what?", "what?"])
    assert predictor.cache_stats() == before  # refused before any model work


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("question=", "error: the question is empty"),
        ("image=/nonexistent/cat.jpg", "error: image not found: /nonexistent/cat.jpg"),
        ("ckpt_path=/nonexistent.ckpt", "error: checkpoint not found: /nonexistent.ckpt"),
    ],
)
def test_cli_reports_bad_input_in_one_line(
    run: TinyRun,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    override: str,
    message: str,
) -> None:
    question = run.questions("val2014")[0]
    arguments = {
        "ckpt_path": str(run.ckpt),
        "image": str(run.image("val2014", question["image_id"])),
        "question": question["question"],
    }
    key, value = override.split("=", 1)
    arguments[key] = value
    argv = [
        "vqa.cli.predict",
        *(f"{k}={v}" for k, v in arguments.items()),
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as exit_info:
        vqa_predict.main()
    GlobalHydra.instance().clear()
    assert exit_info.value.code == vqa_predict.EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.err.strip() == message and "Traceback" not in captured.out
