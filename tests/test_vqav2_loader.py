"""The VQA v2 loader on a generated fixture in the official layout: join, schema, splits,
odd image formats decoded to RGB, and the hub source (offline)."""

from __future__ import annotations

import io
import json
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, List, Value, load_dataset, load_dataset_builder
from PIL import Image as PILImage

from vqa.data.collate import VQACollator
from vqa.data.dataset import VQADataset
from vqa.data.errors import BadRecordLog
from vqa.data.hub import HubSource
from vqa.data.hub_access import HubUnavailableError
from vqa.data.images import IMAGENET_MEAN, IMAGENET_STD, build_transform, load_rgb
from vqa.data.layout import annotations_path, split_layout
from vqa.data.shapes import ShapesConfig, family_of, generate
from vqa.data.table import FEATURES
from vqa.data.vqav2 import load_vqav2_split

CONFIG = ShapesConfig(
    num_train_images=6,
    num_val_images=3,
    num_test_images=2,
    questions_per_image=3,
    image_size=48,
    seed=5,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vqa") / "root"
    generate(root, CONFIG)
    return root


@pytest.fixture
def root(pristine: Path, tmp_path: Path) -> Path:
    """A private copy each test may damage."""
    return Path(shutil.copytree(pristine, tmp_path / "root"))


def placeholder_encoding(n: int) -> Dataset:
    return Dataset.from_dict(
        {"input_ids": [[2, 3]] * n, "target_index": [[0]] * n, "target_score": [[1.0]] * n}
    )


def unnormalise(image: torch.Tensor) -> np.ndarray:
    mean, std = (
        torch.tensor(IMAGENET_MEAN)[:, None, None],
        torch.tensor(IMAGENET_STD)[:, None, None],
    )
    return ((image * std + mean) * 255).permute(1, 2, 0).numpy()


def test_questions_and_annotations_are_joined_by_question_id(root: Path) -> None:
    bad = BadRecordLog("skip")
    loaded = load_vqav2_split(root, "train2014", bad)
    table = loaded.table
    assert loaded.annotated and bad.total == 0
    assert table.features == FEATURES
    assert len(table) == 6 * 3
    layout = split_layout(root, "train2014")
    annotations = {
        a["question_id"]: a for a in json.loads(layout.annotations.read_text())["annotations"]
    }
    questions = {q["question_id"]: q for q in json.loads(layout.questions.read_text())["questions"]}
    for row in table:
        ann = annotations[row["question_id"]]
        assert row["question"] == questions[row["question_id"]]["question"]
        assert row["answers"] == [a["answer"] for a in ann["answers"]]
        assert row["multiple_choice_answer"] == ann["multiple_choice_answer"]
        assert (row["question_type"], row["answer_type"]) == (
            ann["question_type"],
            ann["answer_type"],
        )
        assert Path(row["image_path"]).is_absolute()
        assert Path(row["image_path"]) == layout.image_path(row["image_id"]).resolve()


def test_synthetic_test2015_is_annotated(root: Path) -> None:
    test = load_vqav2_split(root, "test2015")
    assert split_layout(root, "test2015").annotations == annotations_path(root, "test2015")
    assert test.annotated and len(test.table) == 2 * 3
    assert all(len(a) == 10 for a in test.table["answers"])
    assert set(test.table["answer_type"]) <= {"yes/no", "number", "other"}


def test_annotations_are_optional_for_test_splits_only(root: Path) -> None:
    """VQA v2's test splits have no annotations file: questions only. A missing train/val file
    stays the loader's error to report, so the layout names it whatever."""
    annotations_path(root, "test2015").unlink()
    annotations_path(root, "val2014").unlink()
    assert split_layout(root, "test2015").annotations is None
    assert split_layout(root, "test-dev2015").annotations is None
    assert split_layout(root, "val2014").annotations == annotations_path(root, "val2014")
    assert not annotations_path(root, "val2014").exists()


def test_test_splits_have_questions_only_and_test_dev_uses_test2015_images(root: Path) -> None:
    annotations_path(root, "test2015").unlink()  # the VQA v2 layout: no public test answers
    test = load_vqav2_split(root, "test2015")
    assert not test.annotated and len(test.table) == 2 * 3
    assert set(test.table["answers"][0]) == set() and test.table["multiple_choice_answer"][0] == ""
    # test-dev2015 is a subset of test2015's questions, on test2015 images
    questions = json.loads(split_layout(root, "test2015").questions.read_text())
    questions["questions"] = questions["questions"][:2]
    split_layout(root, "test-dev2015").questions.write_text(json.dumps(questions))
    dev = load_vqav2_split(root, "test-dev2015")
    assert len(dev.table) == 2
    assert all("/test2015/COCO_test2015_" in p for p in dev.table["image_path"])


def test_question_family_is_read_when_present_and_none_otherwise(root: Path) -> None:
    layout = split_layout(root, "val2014")
    questions = json.loads(layout.questions.read_text())["questions"]
    with_families = load_vqav2_split(root, "val2014").table
    assert with_families["question_family"] == [family_of(q["question"]) for q in questions]

    payload = json.loads(layout.annotations.read_text())
    for ann in payload["annotations"]:
        del ann["question_family"]  # the official VQA v2 records
    layout.annotations.write_text(json.dumps(payload))
    table = load_vqav2_split(root, "val2014").table
    assert table["question_family"] == [None] * len(questions)
    dataset = VQADataset(table, placeholder_encoding(len(table)), build_transform(40), True)
    batch = VQACollator(0, 4)([dataset[0], dataset[1]])
    assert batch.question_family is None and len(batch.answers) == 2

    payload["annotations"][0]["question_family"] = 3
    layout.annotations.write_text(json.dumps(payload))
    bad = BadRecordLog("skip")
    assert len(load_vqav2_split(root, "val2014", bad).table) == len(questions) - 1
    assert bad.counts == {"malformed_record": 1}


def test_unknown_split_lists_the_known_ones(root: Path) -> None:
    with pytest.raises(ValueError, match=r"train2014.*val2014"):
        load_vqav2_split(root, "train2017")


def test_fingerprint_follows_the_content(root: Path) -> None:
    first = load_vqav2_split(root, "val2014").fingerprint
    assert load_vqav2_split(root, "val2014").fingerprint == first
    path = split_layout(root, "val2014").annotations
    payload = json.loads(path.read_text())
    payload["annotations"][0]["answers"][0]["answer"] = "something else"
    path.write_text(json.dumps(payload))
    assert load_vqav2_split(root, "val2014").fingerprint != first


def _rewrite(path: Path, convert: str, fmt: str) -> np.ndarray:
    """Re-save an image in another mode/format under the same .jpg name; return the original."""
    original = PILImage.open(path).convert("RGB")
    image = original.convert(convert)
    image.save(path, format=fmt)
    return np.asarray(original, dtype=np.float32)


def test_grayscale_cmyk_palette_and_png_in_jpg_decode_to_rgb(root: Path) -> None:
    layout = split_layout(root, "train2014")
    gray = _rewrite(layout.image_path(1), "L", "JPEG")
    cmyk = _rewrite(layout.image_path(2), "CMYK", "JPEG")
    png = _rewrite(layout.image_path(3), "RGB", "PNG")
    palette = _rewrite(layout.image_path(4), "P", "PNG")
    assert PILImage.open(layout.image_path(2)).mode == "CMYK"
    assert PILImage.open(layout.image_path(3)).format == "PNG"

    decoded = {
        i: np.asarray(load_rgb(layout.image_path(i)), dtype=np.float32) for i in (1, 2, 3, 4)
    }
    assert all(d.shape == (48, 48, 3) for d in decoded.values())
    assert np.array_equal(decoded[3], png)  # lossless: exactly the original pixels
    assert np.abs(decoded[2] - cmyk).mean() < 6  # CMYK JPEG back to the same colours
    assert np.ptp(decoded[1], axis=2).max() == 0  # grey stays grey in all three channels
    assert np.abs(decoded[1][..., 0] - gray.mean(axis=2)).mean() < 12
    assert np.abs(decoded[4] - palette).mean() < 12  # palette quantisation only

    # The whole path: table -> dataset -> normalised tensors the same size for every image.
    table = load_vqav2_split(root, "train2014").table
    dataset = VQADataset(
        table, placeholder_encoding(len(table)), build_transform(40), annotated=True
    )
    batch = VQACollator(pad_token_id=0, num_answers=2)([dataset[i] for i in range(len(dataset))])
    images = batch.images[batch.image_index]  # back to one image per question
    assert images.shape == (len(table), 3, 40, 40) and images.dtype == torch.float32
    first_gray = next(i for i, image_id in enumerate(table["image_id"]) if image_id == 1)
    pixels = unnormalise(images[first_gray])
    assert np.ptp(pixels, axis=2).max() < 1e-3 and pixels.min() > -1e-3 and pixels.max() < 255.001


# ----------------------------------------------------------------------------------- hub source

HUB_FEATURES = Features(
    {
        "question_type": Value("string"),
        "multiple_choice_answer": Value("string"),
        "answers": List(
            {
                "answer": Value("string"),
                "answer_confidence": Value("string"),
                "answer_id": Value("int64"),
            }
        ),
        "image_id": Value("int64"),
        "answer_type": Value("string"),
        "question_id": Value("int64"),
        "question": Value("string"),
        "image": Image(),
    }
)


def fake_hub_split(root: Path) -> Dataset:
    """val2014 of the fixture in the schema of lmms-lab/VQAv2 (images embedded as bytes)."""
    layout = split_layout(root, "val2014")
    questions = {q["question_id"]: q for q in json.loads(layout.questions.read_text())["questions"]}
    rows = []
    for ann in json.loads(layout.annotations.read_text())["annotations"]:
        image = layout.image_path(ann["image_id"]).read_bytes()
        ann.pop("question_family")  # the synthetic set's own field; VQA v2 has none
        rows.append(
            {
                **ann,
                "question": questions[ann["question_id"]]["question"],
                "image": {"bytes": image, "path": None},
            }
        )
    rows[1]["answers"] = rows[1]["answers"][:9]
    return Dataset.from_list(rows, features=HUB_FEATURES)


def test_hub_source_validates_rows_and_keeps_images_inside(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = fake_hub_split(root)
    monkeypatch.setattr("vqa.data.hub.load_cached_dataset", lambda *args, **kwargs: hub)
    bad = BadRecordLog("skip")
    loaded = HubSource().load_split(None, "val2014", bad)
    assert bad.counts == {"wrong_answer_count": 1}
    assert len(loaded.table) == len(hub) - 1
    assert "image" in loaded.table.column_names and "image_path" not in loaded.table.column_names
    assert loaded.table["question_id"] == [q for i, q in enumerate(hub["question_id"]) if i != 1]
    file_rows = load_vqav2_split(root, "val2014").table
    dataset = VQADataset(
        loaded.table, placeholder_encoding(len(loaded.table)), build_transform(48), annotated=True
    )
    reference = VQADataset(
        file_rows, placeholder_encoding(len(file_rows)), build_transform(48), annotated=True
    )
    by_qid = {reference[i]["question_id"]: reference[i] for i in range(len(reference))}
    for i in range(len(dataset)):
        sample = dataset[i]
        assert torch.equal(
            sample["image"], by_qid[sample["question_id"]]["image"]
        )  # same bytes, same pixels
        assert sample["answers"] == by_qid[sample["question_id"]]["answers"]


def test_hub_source_fails_fast_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError, match=r"lmms-lab/VQAv2.*HF_HUB_OFFLINE.*hf download"):
        HubSource(cache_dir=str(tmp_path)).load_split(None, "val2014", BadRecordLog())
    assert time.perf_counter() - start < 10


def test_hub_source_fails_fast_when_the_hub_is_unreachable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("vqa.data.hub_access.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("vqa.data.hub_access.constants.ENDPOINT", "https://hub.invalid")
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    called = []
    monkeypatch.setattr("vqa.data.hub.load_dataset", lambda *a, **k: called.append(a))
    with pytest.raises(HubUnavailableError, match="cannot be reached"):
        HubSource(cache_dir=str(tmp_path)).load_split(None, "val2014", BadRecordLog())
    assert not called  # no minute of retries inside datasets


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
# How lmms-lab/VQAv2 declares its splits (README.md front matter).
HUB_README = """---
configs:
- config_name: default
  data_files:
  - split: validation
    path: data/validation-*
---
"""


def write_hub_repo(folder: Path, root: Path) -> Path:
    """The files of a hub dataset repository holding the fixture's val2014 as `validation`."""
    (folder / "data").mkdir(parents=True)
    fake_hub_split(root).to_parquet(folder / "data" / "validation-00000-of-00001.parquet")
    (folder / "README.md").write_text(HUB_README)
    return folder


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple]:
    """Online mode (no HF_HUB_OFFLINE) on a machine where every connection fails at once;
    returns the attempts. The hub cache is an empty folder unless a test fills it."""
    attempts: list[tuple] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    return attempts


def expected_hub_rows(root: Path) -> list[int]:
    return [q for i, q in enumerate(fake_hub_split(root)["question_id"]) if i != 1]


def test_hub_source_reads_a_prepared_copy_without_network_or_offline_mode(
    root: Path, tmp_path: Path, no_network: list[tuple]
) -> None:
    # What an earlier online load leaves in the datasets cache: the Arrow tables under
    # <namespace>___<name>/<config>/<version>/<commit>. Prepared by datasets itself from the
    # repository files, then moved to the hub name and commit.
    cache = tmp_path / "datasets"
    builder = load_dataset_builder(str(write_hub_repo(tmp_path / "VQAv2", root)), cache_dir=cache)
    builder.download_and_prepare()
    prepared = Path(builder.cache_dir)
    prepared.rename(prepared.with_name(HUB_COMMIT))
    (cache / "vq_av2").rename(cache / "lmms-lab___vq_av2")
    with pytest.MonkeyPatch.context() as offline:  # it is the copy datasets reads when offline
        offline.setattr("datasets.config.HF_HUB_OFFLINE", True)
        assert len(load_dataset("lmms-lab/VQAv2", split="validation", cache_dir=str(cache))) == 9

    for revision in (None, HUB_COMMIT):
        bad = BadRecordLog("skip")
        source = HubSource(cache_dir=str(cache), revision=revision)
        loaded = source.load_split(None, "val2014", bad)
        assert loaded.table["question_id"] == expected_hub_rows(root)
        assert bad.counts == {"wrong_answer_count": 1}
    assert not no_network  # not even the reachability probe
    other = HubSource(cache_dir=str(cache), revision="f" * 40)  # a commit not in the cache
    with pytest.raises(HubUnavailableError, match=r"lmms-lab/VQAv2.*cannot be reached.*HF_HOME"):
        other.load_split(None, "val2014", BadRecordLog("skip"))


def test_hub_source_reads_downloaded_files_without_network_or_offline_mode(
    root: Path, tmp_path: Path, no_network: list[tuple]
) -> None:
    # What `hf download lmms-lab/VQAv2 --repo-type dataset` leaves in the hub cache, which
    # datasets does not read by itself even with HF_HUB_OFFLINE=1.
    repo = tmp_path / "hub" / "datasets--lmms-lab--VQAv2"
    write_hub_repo(repo / "snapshots" / HUB_COMMIT, root)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    source = HubSource(cache_dir=str(tmp_path / "datasets"))
    for _ in range(2):  # prepared on first use, read back after
        loaded = source.load_split(None, "val2014", BadRecordLog("skip"))
        assert loaded.table["question_id"] == expected_hub_rows(root)
    assert not no_network


def test_image_bytes_from_a_table_decode_like_files(root: Path) -> None:
    path = split_layout(root, "val2014").image_path(7)
    buffer = io.BytesIO()
    PILImage.open(path).convert("L").save(buffer, format="PNG")
    assert load_rgb(buffer.getvalue(), name="hub:x").mode == "RGB"
