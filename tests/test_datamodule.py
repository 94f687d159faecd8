"""VQADataModule: the batch contract, soft targets, the tokenisation cache, artifacts, configs;
and the tokenizer it builds or loads."""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue
from PIL import Image, ImageDraw

import vqa.data.datamodule as datamodule_module
from vqa.data.answers import AnswerVocab, normalize_answer, soft_target_tensor
from vqa.data.artifacts import artifacts_from_dict, load_artifacts
from vqa.data.batch import VQABatch
from vqa.data.datamodule import VQADataModule
from vqa.data.errors import DataError
from vqa.data.hub import HubSource
from vqa.data.hub_access import HubUnavailableError
from vqa.data.images import IMAGENET_MEAN, IMAGENET_STD, build_transform
from vqa.data.layout import annotations_path
from vqa.data.shapes import FAMILIES, MANIFEST_NAME, family_of
from vqa.data.sources import ShapesSource, VQAv2Source
from vqa.data.tokenizer import SPECIAL_TOKENS, TokenizerSpec, load_tokenizer, tokenizer_spec
from vqa.metrics import ANSWER_TYPES

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "data"
SOURCE = ShapesSource(
    num_train_images=16,
    num_val_images=6,
    num_test_images=3,
    questions_per_image=4,
    image_size=48,
    seed=2,
)
BATCH_KEYS = {
    "images",
    "image_index",
    "input_ids",
    "attention_mask",
    "question_id",
    "image_id",
    "question",
    "question_type",
    "answer_type",
}


# What an annotated split of the synthetic set adds (question_family: not in VQA v2's data).
ANNOTATED_KEYS = {"answers", "targets", "answer_type_id", "question_family"}


def present(batch: VQABatch) -> set[str]:
    """The fields a batch carries (the others are None)."""
    return {f.name for f in dataclasses.fields(batch) if getattr(batch, f.name) is not None}


def make_dm(root: Path, cache_dir: Path | None, **overrides: Any) -> VQADataModule:
    kwargs = {
        "source": SOURCE,
        "root": root,
        "cache_dir": cache_dir,
        "image_size": 40,
        "min_answer_count": 1,
        "batch_size": 8,
        "eval_batch_size": 16,
    }
    return VQADataModule(**(kwargs | overrides))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dm") / "shapes"
    make_dm(root, None).prepare_data()
    return root


@pytest.fixture(scope="module")
def fitted(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> VQADataModule:
    dm = make_dm(data_root, tmp_path_factory.mktemp("cache"))
    dm.setup("fit")
    return dm


def test_prepare_data_generates_only_when_missing(data_root: Path) -> None:
    manifest = data_root / MANIFEST_NAME
    before = manifest.stat().st_mtime_ns
    make_dm(data_root, None).prepare_data()
    assert manifest.stat().st_mtime_ns == before
    with pytest.raises(DataError, match="prepare_data"):
        make_dm(data_root, None, source=ShapesSource(**{**SOURCE.__dict__, "seed": 99})).setup(
            "fit"
        )


def test_train_batch_contract(fitted: VQADataModule) -> None:
    batch = next(iter(fitted.train_dataloader()))
    assert isinstance(batch, VQABatch)
    assert present(batch) == BATCH_KEYS | ANNOTATED_KEYS
    b = 8
    images = batch.images
    # each distinct image once; image_index maps the b questions to their image rows
    assert images.shape == (batch.image_id.unique().numel(), 3, 40, 40)
    assert images.dtype == torch.float32 and batch.image_index.shape == (b,)
    for i, j in itertools.combinations(range(b), 2):
        same_image = bool(batch.image_id[i] == batch.image_id[j])
        assert same_image == bool(batch.image_index[i] == batch.image_index[j])
    pixels = (
        images * torch.tensor(IMAGENET_STD)[:, None, None]
        + torch.tensor(IMAGENET_MEAN)[:, None, None]
    )
    assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4 and images.mean().abs() < 2

    ids, mask, tok = batch.input_ids, batch.attention_mask, fitted.tokenizer
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape
    assert ids.shape[1] <= 14 and mask.sum(1).max() == ids.shape[1]  # padded to the longest
    assert torch.equal(mask.bool(), ids != tok.pad_token_id)
    lengths = mask.sum(1)
    assert (ids[:, 0] == tok.cls_token_id).all()
    assert (ids[torch.arange(b), lengths - 1] == tok.sep_token_id).all()
    for row, question in zip(ids, batch.question, strict=True):
        assert tok.decode(row, skip_special_tokens=True).replace(" ", "") == question.replace(
            " ", ""
        )

    assert batch.question_id.dtype == batch.image_id.dtype == torch.long
    assert batch.question_id.shape == (b,) and torch.equal(
        batch.question_id // 1000, batch.image_id
    )
    assert len(batch.question) == len(batch.question_type) == len(batch.answer_type) == b
    assert batch.num_questions == batch.num_real_questions == b
    assert all(len(a) == 10 for a in batch.answers)
    assert batch.answer_type_id.dtype == torch.long
    assert [ANSWER_TYPES[i] for i in batch.answer_type_id.tolist()] == list(batch.answer_type)

    vocab = fitted.answer_vocab
    assert batch.targets.shape == (b, len(vocab)) and batch.targets.dtype == torch.float32
    for target, answers in zip(batch.targets, batch.answers, strict=True):
        assert torch.equal(target, soft_target_tensor(answers, vocab))
        majority = Counter(normalize_answer(a) for a in answers).most_common(1)[0][0]
        assert vocab.decode(int(target.argmax())) == majority and target.max() == 1.0


@pytest.mark.parametrize("visual", ["images", "visual_features"])
def test_batch_transfer_moves_tensors_and_leaves_strings_alone(
    fitted: VQADataModule, visual: str
) -> None:
    batch = next(iter(fitted.train_dataloader()))
    if visual == "visual_features":  # as a cached batch has them
        batch = dataclasses.replace(
            batch, images=None, visual_features=(torch.zeros(2, 3), torch.ones(2, 4))
        )
    moved = fitted.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert isinstance(moved, VQABatch) and present(moved) == present(batch)
    for f in dataclasses.fields(batch):
        value, after = getattr(batch, f.name), getattr(moved, f.name)
        if isinstance(value, torch.Tensor):
            assert after.device.type == "meta" and after.shape == value.shape, f.name
            assert value.device.type == "cpu", f"{f.name}: moved in place"
        elif f.name == "visual_features" and value is not None:
            assert [t.device.type for t in after] == ["meta", "meta"]
        else:  # questions, answer strings: the very objects, not walked element by element
            assert after is value, f.name


def test_other_batch_types_get_lightnings_transfer(fitted: VQADataModule) -> None:
    batch = {"x": torch.zeros(2), "names": ["a", "b"]}
    moved = fitted.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved["x"].device.type == "meta" and moved["names"] == ["a", "b"]


def test_a_pinning_loader_with_workers_yields_typed_batches(data_root: Path) -> None:
    """data.pin_memory reaches the DataLoader, whose pin-memory thread calls
    VQABatch.pin_memory; without an accelerator torch warns and skips pinning."""
    dm = make_dm(data_root, None, num_workers=1, pin_memory=True)
    dm.setup("validate")
    loader = dm.val_dataloader()
    assert loader.pin_memory and loader.num_workers == 1
    if torch.accelerator.is_available():
        batch = next(iter(loader))
        assert batch.input_ids.is_pinned() and batch.images.is_pinned()
    else:
        with pytest.warns(UserWarning, match="pin_memory"):
            batch = next(iter(loader))
    assert isinstance(batch, VQABatch) and present(batch) >= BATCH_KEYS


def test_truncation_keeps_sep(data_root: Path) -> None:
    dm = make_dm(data_root, None, max_question_length=5)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    ids, lengths = batch.input_ids, batch.attention_mask.sum(1)
    assert ids.shape[1] == 5 and (lengths == 5).any()
    assert (ids[torch.arange(len(ids)), lengths - 1] == dm.tokenizer.sep_token_id).all()


def test_synthetic_test_split_is_annotated(data_root: Path) -> None:
    dm = make_dm(data_root, None, test_split="test2015")
    dm.setup("test")
    assert dm.tables["test2015"].annotated
    batch = next(iter(dm.test_dataloader()))
    assert present(batch) == BATCH_KEYS | ANNOTATED_KEYS
    assert set(batch.answer_type) <= set(ANSWER_TYPES) and all(len(a) == 10 for a in batch.answers)
    assert batch.question_family == tuple(family_of(q) for q in batch.question)


def test_unannotated_test_split_has_no_answers(data_root: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(data_root, tmp_path / "shapes"))
    annotations_path(root, "test2015").unlink()  # the VQA v2 layout: no public test answers
    dm = make_dm(root, None, test_split="test2015")
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert present(batch) == BATCH_KEYS and batch.image_index.shape[0] == 3 * 4
    assert batch.images.shape[0] == 3  # 3 images x 4 questions, each image stored once
    assert batch.answer_type == ("",) * 12 and batch.question_family is None
    assert set(dm.datasets) == {"test2015"}  # train/val were read for the vocabulary only


def test_question_families_reach_the_batch(fitted: VQADataModule) -> None:
    assert fitted.question_families == sorted(f.name for f in FAMILIES)
    for batch in itertools.chain(fitted.train_dataloader(), fitted.val_dataloader()):
        assert batch.question_family == tuple(family_of(q) for q in batch.question)


def test_an_epoch_sees_every_question_once_shuffled(data_root: Path) -> None:
    dm = make_dm(data_root, None, batch_size=5)
    dm.setup("fit")
    order = torch.cat([b.question_id for b in dm.train_dataloader()]).tolist()
    table_order = dm.tables["train2014"].table["question_id"]
    assert sorted(order) == sorted(table_order) and len(order) == 64  # 64 = 12 batches + 4
    assert order != table_order
    val_order = torch.cat([b.question_id for b in dm.val_dataloader()]).tolist()
    assert val_order == dm.tables["val2014"].table["question_id"]


def test_answer_vocab_from_train_and_val_and_question_types(
    fitted: VQADataModule, data_root: Path
) -> None:
    tables = fitted.tables
    answers = [
        *tables["train2014"].table["multiple_choice_answer"],
        *tables["val2014"].table["multiple_choice_answer"],
    ]
    assert fitted.answer_vocab.answers == AnswerVocab.build(answers, min_count=1).answers
    assert fitted.question_types == sorted(
        set(tables["train2014"].table["question_type"])
        | set(tables["val2014"].table["question_type"])
    )
    assert "how many" in fitted.question_types
    assert {"train2014", "val2014"} <= set(fitted.bad_records) and not any(
        fitted.bad_records.values()
    )
    strict = make_dm(data_root, None, min_answer_count=10)
    strict.setup("validate")
    counts = Counter(answers)
    assert set(strict.answer_vocab.answers) == {a for a, n in counts.items() if n >= 10}


def test_tokenisation_cache_is_reused(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = Counter()
    encode = datamodule_module.encode_batch

    def counting(*args: Any, **kwargs: Any) -> dict:
        calls["n"] += 1
        return encode(*args, **kwargs)

    monkeypatch.setattr(datamodule_module, "encode_batch", counting)
    make_dm(data_root, tmp_path).setup("fit")
    files = {p: p.stat().st_mtime_ns for p in tmp_path.glob("encoded-*.arrow")}
    assert calls["n"] > 0 and {p.name.split("-")[1] for p in files} == {"train2014", "val2014"}

    calls.clear()
    again = make_dm(data_root, tmp_path)  # a fresh module, e.g. the next run
    again.setup("fit")
    assert calls["n"] == 0
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("encoded-*.arrow")} == files
    assert (
        len(again.datasets["train2014"]) == 64
        and again.datasets["train2014"][0]["input_ids"][0] == 2
    )

    make_dm(data_root, tmp_path, max_question_length=8).setup("fit")  # other settings: new cache
    assert calls["n"] > 0 and len(list(tmp_path.glob("encoded-*.arrow"))) == 4


def test_artifacts_round_trip_and_evaluation_reuses_them(
    fitted: VQADataModule, data_root: Path, tmp_path: Path
) -> None:
    fitted.save_artifacts(tmp_path / "run")
    vocab, tokenizer = load_artifacts(tmp_path / "run")
    assert vocab.answers == fitted.answer_vocab.answers
    path = tmp_path / "artifacts.pt"
    torch.save(fitted.artifacts(), path)
    vocab2, tokenizer2 = artifacts_from_dict(torch.load(path, weights_only=True))
    assert vocab2.answers == vocab.answers
    questions = [*fitted.tables["val2014"].table["question"], "an unseen hexagon?"]
    expected = fitted.tokenizer(questions)["input_ids"]
    assert tokenizer(questions)["input_ids"] == expected == tokenizer2(questions)["input_ids"]

    evaluation = make_dm(data_root, None, answer_vocab=vocab2, tokenizer=tokenizer2)
    evaluation.setup("validate")
    ours, theirs = next(iter(fitted.val_dataloader())), next(iter(evaluation.val_dataloader()))
    assert torch.equal(ours.input_ids, theirs.input_ids) and torch.equal(
        ours.targets, theirs.targets
    )
    with pytest.raises(RuntimeError, match="setup"):
        make_dm(data_root, None).artifacts()


def test_workers_give_the_same_batches(data_root: Path) -> None:
    single = make_dm(data_root, None)
    single.setup("validate")
    workers = make_dm(data_root, None, num_workers=1, persistent_workers=True)
    workers.setup("validate")
    loader = workers.val_dataloader()
    assert loader.persistent_workers and not single.val_dataloader().persistent_workers
    assert not make_dm(data_root, None, persistent_workers=True).persistent_workers  # needs workers
    a, b = next(iter(single.val_dataloader())), next(iter(loader))
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)


def test_augmentation_never_flips_or_recolours() -> None:
    canvas = Image.new("RGB", (64, 64), (200, 200, 200))
    draw = ImageDraw.Draw(canvas)
    draw.ellipse((8, 24, 24, 40), fill=(220, 40, 40))  # red on the left
    draw.rectangle((42, 24, 56, 38), fill=(40, 80, 225))  # blue on the right
    plain, augment = build_transform(64), build_transform(64, augment=True)
    torch.manual_seed(0)
    changed = 0
    for _ in range(20):
        image = augment(canvas)
        changed += not torch.allclose(image, plain(canvas))
        r, g, b = image
        red = (r > g + 1) & (r > b + 1)
        blue = (b > r + 1) & (b > g + 1)
        columns = torch.arange(64.0)
        assert red.sum() > 100 and blue.sum() > 100  # both still there, still their colour
        assert (red.float().sum(0) @ columns) / red.sum() < (
            blue.float().sum(0) @ columns
        ) / blue.sum()
    assert changed >= 18  # it does augment


# ------------------------------------------------------------------------------------ tokenizer

QUESTIONS = [
    "Is there a red circle?",
    "how many BLUE shapes are there?",
    "what color is the triangle?",
]


def test_built_tokenizer_is_deterministic_uncased_bert_wordpiece(tmp_path: Path) -> None:
    first = load_tokenizer(None, texts=QUESTIONS, save_dir=tmp_path / "tok")
    second = load_tokenizer(None, texts=list(reversed(QUESTIONS)) + QUESTIONS)
    assert first.get_vocab() == second.get_vocab()
    assert [first.convert_ids_to_tokens(i) for i in range(5)] == list(SPECIAL_TOKENS)
    assert first.pad_token_id == 0 and first.unk_token == "[UNK]" and first.mask_token == "[MASK]"
    assert first("RED Circle")["input_ids"] == first("red circle")["input_ids"]
    tokens = first.tokenize("is there a hexagon?")
    assert tokens[:3] == ["is", "there", "a"] and "[UNK]" not in tokens
    assert "".join(t.removeprefix("##") for t in tokens[3:-1]) == "hexagon"
    reloaded = load_tokenizer(str(tmp_path / "tok"))
    assert reloaded(QUESTIONS)["input_ids"] == first(QUESTIONS)["input_ids"]
    with pytest.raises(ValueError, match="texts"):
        load_tokenizer(None)


def test_the_text_encoder_config_chooses_the_tokenizer() -> None:
    text_configs = Path(__file__).resolve().parents[1] / "configs" / "model" / "text"
    for path in sorted(text_configs.glob("*.yaml")):
        text = OmegaConf.load(path)
        assert tokenizer_spec(text) == TokenizerSpec(text.name_or_path), path.name
    assert tokenizer_spec({"name_or_path": None}).built_from_questions
    assert tokenizer_spec(None) == TokenizerSpec()
    pretrained = tokenizer_spec({"name_or_path": "bert-base-uncased", "pretrained": True})
    assert pretrained.name_or_path == "bert-base-uncased" and not pretrained.built_from_questions
    for path in sorted(CONFIG_DIR.glob("*.yaml")):  # the data configs no longer name one
        assert "tokenizer" not in OmegaConf.load(path), path.name


def test_datamodule_builds_the_tokenizer_it_is_told_to(
    fitted: VQADataModule, data_root: Path, tmp_path: Path
) -> None:
    saved = tmp_path / "tok"
    fitted.tokenizer.save_pretrained(saved)
    dm = make_dm(data_root, None, answer_vocab=fitted.answer_vocab)
    dm.use_tokenizer(TokenizerSpec(str(saved)))
    dm.setup("validate")
    assert dm.tokenizer.get_vocab() == fitted.tokenizer.get_vocab()
    assert list(dm.tables) == ["val2014"]  # a named tokenizer never loads the training questions

    built = make_dm(data_root, None, answer_vocab=fitted.answer_vocab)
    built.use_tokenizer(TokenizerSpec(None))  # the default: WordPiece from the questions
    built.setup("validate")
    assert built.tokenizer.get_vocab() == fitted.tokenizer.get_vocab()
    assert "train2014" in built.tables

    ready = load_tokenizer(None, texts=QUESTIONS)
    given = make_dm(data_root, None, answer_vocab=fitted.answer_vocab, tokenizer=ready)
    given.use_tokenizer(TokenizerSpec(str(saved)))
    given.setup("validate")
    assert given.tokenizer is ready  # a checkpoint's tokenizer wins over any choice


def test_hub_tokenizer_fails_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(
        HubUnavailableError, match=r"coattn-vqa/not-cached.*HF_HUB_OFFLINE.*HF_HOME"
    ):
        load_tokenizer("coattn-vqa/not-cached")
    assert time.perf_counter() - start < 10


# -------------------------------------------------------------------------------------- configs


def data_config(name: str, tmp_path: Path, **data: Any) -> Any:
    """configs/data/<name>.yaml inside the keys it interpolates (as train.yaml provides): paths
    and the seed, nothing of the model's."""
    node = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / f"{name}.yaml"), data)
    return OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "seed": 0, "data": node}).data


def test_shapes_config_instantiates_and_runs(tmp_path: Path) -> None:
    default = instantiate(data_config("shapes", tmp_path))
    assert isinstance(default, VQADataModule) and isinstance(default.source, ShapesSource)
    assert (
        default.source.num_train_images,
        default.source.questions_per_image,
        default.source.image_size,
    ) == (2000, 6, 128)
    # val2014 selects the checkpoint, test2015 (annotated, as large as val) is held out
    assert (default.val_split, default.test_split) == ("val2014", "test2015")
    assert default.source.num_test_images == default.source.num_val_images == 500
    assert default.root == tmp_path / "shapes" and default.cache_dir == tmp_path / "cache"
    tiny = {
        "source": {
            "num_train_images": 3,
            "num_val_images": 2,
            "num_test_images": 1,
            "image_size": 32,
        },
        "image_size": 32,
        "num_workers": 0,
    }
    dm = instantiate(data_config("shapes", tmp_path, **tiny))
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape[1:] == (3, 32, 32) and batch.targets.shape[1] == len(dm.answer_vocab)
    dm.setup("test")
    test_batch = next(iter(dm.test_dataloader()))
    assert test_batch.answers is not None and test_batch.targets is not None


def test_vqav2_configs(tmp_path: Path) -> None:
    with pytest.raises(MissingMandatoryValue, match="root"):
        instantiate(data_config("vqav2", tmp_path))
    dm = instantiate(data_config("vqav2", tmp_path, root=str(tmp_path / "missing")))
    assert (
        isinstance(dm.source, VQAv2Source)
        and dm.min_answer_count == 9
        and dm.max_question_length == 14
    )
    with pytest.raises(DataError, match=r"data\.root"):
        dm.prepare_data()
    hub = instantiate(data_config("vqav2_hub", tmp_path))
    assert isinstance(hub.source, HubSource) and hub.source.split_map["val2014"] == "validation"
