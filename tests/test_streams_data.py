"""Several images per question (``data.streams``) and conditioning fields
(``data.conditioning_fields``) on the data side: the table, bad records, batches, image-grouped
order, the conditioning vocabulary, the feature cache, raw-input preprocessing, and the
unchanged single-image path.

The data set is written by hand in the VQA v2 layout: pair p of a split shows images
``base + 2p`` (left) and ``base + 2p + 1`` (right), each a solid colour of its own.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from vqa.cli.extract import write_stores
from vqa.data.batch import VQABatch
from vqa.data.collate import VQACollator
from vqa.data.datamodule import VQADataModule
from vqa.data.errors import BadRecordLog, DataError
from vqa.data.features import FeatureStore, FeatureStoreError, split_images
from vqa.data.hub import HubSource
from vqa.data.images import build_transform, load_rgb
from vqa.data.layout import split_layout
from vqa.data.preprocess import Preprocessor
from vqa.data.samplers import ImageGroupedSampler
from vqa.data.sources import VQAv2Source
from vqa.data.table import FEATURES
from vqa.data.vqav2 import LOADER_VERSION, load_vqav2_split

STREAMS = ["left", "right"]
FIELDS = ["quadrant"]
IMAGE_SIZE = 8  # network input pixels: small, the images are solid colours
# split -> (first image id, quadrant value of each question: two questions per pair, None = no
# field). val2014 has a value training never saw ("centre") and records without one.
SPLITS = {
    "train2014": (0, ["top left", "top right", "bottom left", None, "top left", "top right"]),
    "val2014": (100, ["top left", "centre", None, "centre"]),
}


def colour(image_id: int) -> tuple[int, int, int]:
    return (image_id * 37 % 256, image_id * 91 % 256, image_id * 53 % 256)


def write_split(root: Path, split: str) -> None:
    base, quadrants = SPLITS[split]
    layout = split_layout(root, split)
    layout.image_dir.mkdir(parents=True, exist_ok=True)
    questions, annotations = [], []
    for n, quadrant in enumerate(quadrants):
        pair = n // 2
        left, right = base + 2 * pair, base + 2 * pair + 1
        qid = base * 10 + n
        record: dict[str, Any] = {
            "question_id": qid,
            "image_id": left,
            "image_ids": {"left": left, "right": right},
            "question": f"is the left one redder than the right one {n}?",
        }
        if quadrant is not None:
            record["quadrant"] = quadrant
        questions.append(record)
        answer = "yes" if n % 2 else "no"
        annotations.append(
            {
                "question_id": qid,
                "image_id": left,
                "question_type": "is the",
                "answer_type": "yes/no",
                "multiple_choice_answer": answer,
                "answers": [
                    {"answer": answer, "answer_confidence": "yes", "answer_id": i + 1}
                    for i in range(10)
                ],
            }
        )
        for image_id in (left, right):
            # PNG content in the .jpg name (the content picks the decoder): exact pixels
            Image.new("RGB", (12, 12), colour(image_id)).save(
                layout.image_path(image_id), format="PNG"
            )
    layout.questions.parent.mkdir(parents=True, exist_ok=True)
    layout.annotations.parent.mkdir(parents=True, exist_ok=True)
    layout.questions.write_text(json.dumps({"questions": questions}))
    layout.annotations.write_text(json.dumps({"annotations": annotations}))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pairs") / "root"
    for split in SPLITS:
        write_split(root, split)
    return root


def edit_questions(root: Path, split: str, edit: Any) -> None:
    path = split_layout(root, split).questions
    payload = json.loads(path.read_text())
    edit(payload["questions"])
    path.write_text(json.dumps(payload))


def make_dm(root: Path, **overrides: Any) -> VQADataModule:
    kwargs = {
        "source": VQAv2Source(),
        "root": root,
        "image_size": IMAGE_SIZE,
        "min_answer_count": 1,
        "batch_size": 4,
        "eval_batch_size": 8,
        "group_by_image": True,
        "streams": STREAMS,
        "conditioning_fields": FIELDS,
    }
    return VQADataModule(**(kwargs | overrides))


@pytest.fixture(scope="module")
def fitted(root: Path) -> VQADataModule:
    dm = make_dm(root)
    dm.setup("fit")
    return dm


def pixels(root: Path, image_id: int) -> torch.Tensor:
    """What the data module makes of an image: the evaluation transform of its file."""
    split = "train2014" if image_id < SPLITS["val2014"][0] else "val2014"
    return build_transform(IMAGE_SIZE)(load_rgb(split_layout(root, split).image_path(image_id)))


def whole_split(dm: VQADataModule, split: str) -> VQABatch:
    """All of ``split``'s questions as one batch, through the data module's own collator."""
    dataset = dm.datasets[split]
    loader = dm.train_dataloader() if split == dm.train_split else dm.val_dataloader()
    collate = loader.collate_fn
    return collate(dataset.__getitems__(list(range(len(dataset)))))


# ----------------------------------------------------------------------------- the table


def test_table_has_stream_and_conditioning_columns(root: Path) -> None:
    loaded = load_vqav2_split(root, "train2014", streams=STREAMS, conditioning_fields=FIELDS)
    table = loaded.table
    assert set(table.column_names) == set(FEATURES) | {"image_ids", "image_paths", "conditioning"}
    layout = split_layout(root.resolve(), "train2014")
    assert table["image_ids"] == [[2 * (n // 2), 2 * (n // 2) + 1] for n in range(6)]
    assert table["image_id"] == [ids[0] for ids in table["image_ids"]]
    assert table["image_paths"] == [
        [str(layout.image_path(i)) for i in ids] for ids in table["image_ids"]
    ]
    assert table["image_path"] == [paths[0] for paths in table["image_paths"]]
    assert table["conditioning"] == [[q] for q in SPLITS["train2014"][1]]

    # the first selected stream is the row's image: [right] is the right images' data set
    right = load_vqav2_split(root, "train2014", streams=["right"]).table
    assert right["image_id"] == [2 * (n // 2) + 1 for n in range(6)]
    assert "conditioning" not in right.column_names
    # what is read is part of the content key (caches derived from the table follow it)
    plain = load_vqav2_split(root, "train2014")
    keys = {
        plain.fingerprint,
        loaded.fingerprint,
        load_vqav2_split(root, "train2014", streams=STREAMS).fingerprint,
        load_vqav2_split(root, "train2014", conditioning_fields=FIELDS).fingerprint,
        load_vqav2_split(root, "train2014", streams=["left"]).fingerprint,
    }
    assert len(keys) == 5


def test_without_streams_or_fields_the_table_and_its_key_are_unchanged(root: Path) -> None:
    """Existing caches stay valid: same schema, same rows, the same content key as before
    streams existed (its formula, written out here)."""
    loaded = load_vqav2_split(root, "train2014")
    assert loaded.table.features == FEATURES
    digest = hashlib.blake2b(f"{LOADER_VERSION}|train2014".encode(), digest_size=16)
    for row in loaded.table.to_list():
        digest.update(repr(sorted(row.items())).encode())
    assert loaded.fingerprint == digest.hexdigest()


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda q: q[1]["image_ids"].pop("right"), "missing_stream"),
        (lambda q: q[1].pop("image_ids"), "missing_stream"),
        (lambda q: q[1]["image_ids"].update(right="3"), "malformed_record"),
        (lambda q: q[1]["image_ids"].update(right=999), "missing_image"),
        (lambda q: q[1].update(quadrant=3), "malformed_record"),
    ],
)
def test_bad_stream_records_are_raised_or_counted(
    root: Path, tmp_path: Path, edit: Any, reason: str
) -> None:
    damaged = tmp_path / "root"
    write_split(damaged, "train2014")
    edit_questions(damaged, "train2014", lambda questions: edit(questions))
    with pytest.raises(DataError) as raised:
        load_vqav2_split(damaged, "train2014", streams=STREAMS, conditioning_fields=FIELDS)
    assert raised.value.reason == reason and raised.value.question_id == 1
    bad = BadRecordLog("skip")
    kept = load_vqav2_split(
        damaged, "train2014", bad, streams=STREAMS, conditioning_fields=FIELDS
    ).table
    assert dict(bad.counts) == {reason: 1}
    assert kept["question_id"] == [0, 2, 3, 4, 5]
    # only what is read can be bad: the plain table keeps the question
    assert len(load_vqav2_split(damaged, "train2014").table) == 6


def test_data_module_counts_missing_streams_as_skipped(root: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "root"
    for split in SPLITS:
        write_split(damaged, split)
    edit_questions(damaged, "val2014", lambda q: q[0]["image_ids"].pop("right"))
    dm = make_dm(damaged, on_bad_record="skip")
    dm.setup("fit")
    assert dm.bad_records == {"train2014": {}, "val2014": {"missing_stream": 1}}
    assert len(dm.datasets["val2014"]) == 3


# ----------------------------------------------------------------------------- batches


def test_batch_indexes_each_stream_image_and_holds_each_image_once(
    root: Path, fitted: VQADataModule
) -> None:
    batch = whole_split(fitted, "train2014")
    table = fitted.tables["train2014"].table
    assert batch.image_index.shape == (6, 2) and batch.image_index.dtype == torch.long
    assert batch.images.shape[0] == 6  # three pairs, each image once
    for question, ids in enumerate(table["image_ids"]):
        for stream, image_id in enumerate(ids):
            shown = batch.images[batch.image_index[question, stream]]
            assert torch.equal(shown, pixels(root, image_id)), (question, stream)
    assert batch.image_id.tolist() == [ids[0] for ids in table["image_ids"]]
    assert batch.model_inputs()["image_index"] is batch.image_index


def test_an_image_in_two_streams_is_one_row(fitted: VQADataModule) -> None:
    first, second = fitted.datasets["train2014"].__getitems__([0, 2])  # pairs (0, 1), (2, 3)
    # the second question's right image is the first one's left image
    second = {**second, "image_ids": (2, 0), "images": [second["images"][0], first["images"][0]]}
    batch = VQACollator(0, 2)([first, second])
    assert batch.images.shape[0] == 3
    assert batch.image_index.tolist() == [[0, 1], [2, 0]]


def test_image_grouped_order_keeps_a_pairs_questions_together(fitted: VQADataModule) -> None:
    pairs = [(7, 8), (7, 9), (3, 4), (7, 8), (3, 4), (7, 9)]
    order = list(ImageGroupedSampler(pairs, seed=3))
    assert sorted(order) == list(range(len(pairs)))
    runs = [pairs[i] for i in order]
    assert sum(a != b for a, b in itertools.pairwise(runs)) == len(set(pairs)) - 1
    # the data module groups by the pair: no train batch splits one (2 questions each)
    loader = fitted.train_dataloader()
    for batch in loader:
        assert batch.image_index.shape[0] in (2, 4)
        assert batch.images.shape[0] == batch.image_index.shape[0]


def test_conditioning_vocab_ids_and_unknown_counts(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dm = make_dm(root)
    with caplog.at_level(logging.WARNING, logger="vqa.data.datamodule"):
        dm.setup("fit")
    assert dm.stream_names == STREAMS
    assert dm.conditioning_vocab == {"quadrant": ["bottom left", "top left", "top right"]}
    # train: one question without a value; val: "centre" twice (unseen), one without
    assert dm.unknown_conditioning == {"train2014": {"quadrant": 1}, "val2014": {"quadrant": 3}}
    warnings = [r.getMessage() for r in caplog.records if "unseen in training" in r.getMessage()]
    assert len(warnings) == 2
    assert warnings[1].startswith("val2014: 3 questions have quadrant values")
    assert "['centre', None]" in warnings[1]
    # 0 = unknown, else 1 + the position in the sorted values
    train, val = whole_split(dm, "train2014"), whole_split(dm, "val2014")
    assert train.conditioning_ids.tolist() == [[2], [3], [1], [0], [2], [3]]
    assert val.conditioning_ids.tolist() == [[2], [0], [0], [0]]
    assert val.model_inputs()["conditioning_ids"] is val.conditioning_ids
    # the collator crosses to loader workers
    collate = dm.val_dataloader().collate_fn
    clone = pickle.loads(pickle.dumps(collate))
    two = clone(dm.datasets["val2014"].__getitems__([0, 1]))
    assert torch.equal(two.conditioning_ids, val.conditioning_ids[:2])
    # the vocabulary travels with the run's artifacts
    artifacts = dm.artifacts()
    assert artifacts["conditioning_vocab"] == dm.conditioning_vocab
    assert artifacts["streams"] == STREAMS


def test_a_checkpoints_conditioning_vocab_is_used(root: Path) -> None:
    dm = make_dm(root)
    dm.use_conditioning_vocab({"quadrant": ["centre", "top left"]})
    dm.setup("validate")
    assert dm.unknown_conditioning == {"val2014": {"quadrant": 1}}
    assert whole_split(dm, "val2014").conditioning_ids.tolist() == [[2], [1], [0], [1]]
    with pytest.raises(ValueError, match="same order"):
        make_dm(root).use_conditioning_vocab({"side": ["a"]})
    with pytest.raises(ValueError, match="no conditioning fields"):
        make_dm(root, conditioning_fields=None).use_conditioning_vocab({"quadrant": []})


def test_one_stream_is_the_single_image_data_set_of_its_images(root: Path) -> None:
    """``data.streams=[left]``: [B] batches equal to the plain data set, whose records'
    image_id is the left image."""
    left = make_dm(root, streams=["left"], conditioning_fields=None)
    plain = make_dm(root, streams=None, conditioning_fields=None)
    for dm in (left, plain):
        dm.setup("fit")
    got, want = next(iter(left.train_dataloader())), next(iter(plain.train_dataloader()))
    assert got.image_index.dim() == 1
    for name in ("images", "image_index", "input_ids", "attention_mask", "image_id", "targets"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.conditioning_ids is None and got.question_id.tolist() == want.question_id.tolist()
    assert left.stream_names == ["left"] and plain.stream_names is None


def test_without_streams_or_fields_batches_are_collated_as_before(root: Path) -> None:
    dm = make_dm(root, streams=None, conditioning_fields=None)
    dm.setup("fit")
    assert dm.conditioning_vocab is None and dm.unknown_conditioning == {}
    assert "streams" not in dm.artifacts() and "conditioning_vocab" not in dm.artifacts()
    samples = dm.datasets["train2014"].__getitems__([3, 0, 2, 1])
    assert all("image" in s and "image_ids" not in s and "conditioning" not in s for s in samples)
    batch = VQACollator(dm.tokenizer.pad_token_id, len(dm.answer_vocab))(samples)
    # the single-image collation, written out: each image once, in order of first appearance
    rows: dict[int, int] = {}
    for s in samples:
        rows.setdefault(s["image_id"], len(rows))
    firsts = {s["image_id"]: s["image"] for s in reversed(samples)}
    assert torch.equal(batch.images, torch.stack([firsts[i] for i in rows]))
    assert batch.image_index.tolist() == [rows[s["image_id"]] for s in samples]
    assert batch.conditioning_ids is None and "conditioning_ids" not in batch.model_inputs()


def test_static_shapes_with_streams_or_conditioning_are_refused(root: Path) -> None:
    for options in ({"conditioning_fields": None}, {"streams": None}):
        with pytest.raises(ValueError, match="static_shapes"):
            make_dm(root, static_shapes={"questions": 4}, **options)


def test_hub_source_refuses_streams_before_loading() -> None:
    with pytest.raises(ValueError, match="VQA v2 layout"):
        HubSource().load_split(None, "val2014", BadRecordLog(), streams=STREAMS)


# ----------------------------------------------------------------------------- feature cache


class MeanColour(torch.nn.Module):
    """A frozen stand-in encoder: one stage, each image's mean colour as a 3x1x1 map."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()), requires_grad=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mean": images.mean(dim=(2, 3), keepdim=True) * self.scale}

    def stage_shapes(self, image_size: int) -> dict[str, tuple[int, int, int]]:
        return {"mean": (3, 1, 1)}

    def describe(self) -> MeanColourDescription:
        return MeanColourDescription()


class MeanColourDescription:
    stages, frozen, trainable = ("mean",), True, ()

    def stage_channels(self) -> dict[str, int]:
        return {"mean": 3}

    def stage_digests(self) -> dict[str, str]:
        return {"mean": "mean-colour"}


def extract_stores(dm: VQADataModule, feature_dir: Path) -> None:
    dm.feature_dir = feature_dir
    options = OmegaConf.create(
        {
            "dtype": "float32",
            "batch_size": 3,
            "overwrite": False,
            "num_workers": 0,
            "progress": False,
        }
    )
    write_stores(dm, MeanColour(), {"name": "mean"}, ["train2014", "val2014"], options)


def test_cached_features_cover_every_stream_and_match_the_images(
    root: Path, tmp_path: Path
) -> None:
    extract_stores(make_dm(root), tmp_path / "pairs")
    store = FeatureStore(tmp_path / "pairs" / "train2014")
    assert store.image_ids.tolist() == list(range(6))  # both streams' images
    dm = make_dm(root, features="cached", feature_dir=tmp_path / "pairs")
    dm.setup("fit")
    dm.use_visual_encoder(MeanColour().describe())
    batch = whole_split(dm, "train2014")
    (maps,) = batch.visual_features
    assert batch.images is None and batch.image_index.shape == (6, 2) and maps.shape[0] == 6
    for question, ids in enumerate(dm.tables["train2014"].table["image_ids"]):
        for stream, image_id in enumerate(ids):
            expected = pixels(root, image_id).mean(dim=(1, 2)).view(3, 1, 1)
            torch.testing.assert_close(maps[batch.image_index[question, stream]], expected)
    # one encoder per stream cannot read one shared encoder's maps
    with pytest.raises(FeatureStoreError, match="visual_streams=separate"):
        dm.require_shared_streams("separate")
    dm.require_shared_streams("shared")
    make_dm(root).require_shared_streams("separate")  # images: each stream's encoder runs


def test_a_single_image_store_serves_its_stream_only(root: Path, tmp_path: Path) -> None:
    single = tmp_path / "single"
    extract_stores(make_dm(root, streams=None, conditioning_fields=None), single)
    # the left images' store is the store of data.streams=[left] ...
    left = make_dm(root, streams=["left"], features="cached", feature_dir=single)
    left.setup("fit")
    assert split_images(left.tables["train2014"].table).fingerprint == (
        FeatureStore(single / "train2014").manifest.data_fingerprint
    )
    # ... but not of both streams: other images, refused rather than read
    with pytest.raises(FeatureStoreError, match="changed since"):
        make_dm(root, features="cached", feature_dir=single).setup("fit")


# ----------------------------------------------------------------------------- raw inputs


def test_preprocessor_builds_stream_batches_with_conditioning(
    fitted: VQADataModule, caplog: pytest.LogCaptureFixture
) -> None:
    preprocessor = Preprocessor(
        fitted.tokenizer, 14, IMAGE_SIZE, conditioning_vocab=fitted.conditioning_vocab
    )
    images = [Image.new("RGB", (10, 10), colour(i)) for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="vqa.data.preprocess"):
        batch = preprocessor.batch(
            [images[:2], images[2:]],
            ["is the left one red?", "is it blue?"],
            [{"quadrant": "top right"}, {"quadrant": "centre"}],
        )
    assert batch.image_index.tolist() == [[0, 1], [2, 3]]
    for row, image in enumerate(images):
        assert torch.equal(batch.images[row], preprocessor.pixels(image))
    assert batch.conditioning_ids.tolist() == [[3], [0]]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith("1 of 2 questions have quadrant values")
    with pytest.raises(ValueError, match="unknown conditioning field"):
        preprocessor.batch([images[:2]], ["q?"], [{"quadrnt": "top left"}])
    with pytest.raises(ValueError, match="same number of images"):
        preprocessor.batch([images[:2], images[2]], ["a?", "b?"])
    # a model without streams or conditioning: the single-image batch of before
    plain = Preprocessor(fitted.tokenizer, 14, IMAGE_SIZE)
    single = plain.batch(images[:2], ["a?", "b?"])
    assert single.image_index.tolist() == [0, 1] and single.conditioning_ids is None
    with pytest.raises(ValueError, match="without conditioning"):
        plain.batch(images[:1], ["a?"], [{"quadrant": "top left"}])
