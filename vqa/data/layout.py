"""The official VQA v2 file layout, shared by the loader, the synthetic generator and the checker.

::

    <root>/Questions/v2_OpenEnded_mscoco_<split>_questions.json
    <root>/Annotations/v2_mscoco_<split>_annotations.json        (test splits: only if present)
    <root>/Images/mscoco/<subtype>/COCO_<subtype>_%012d.jpg       (test-dev2015 -> test2015)

VQA v2 publishes no answers for test-dev2015 / test2015 (EvalAI scores them); a synthetic set
knows every answer and writes a test2015 annotations file, which is then read like val2014's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# split -> (image subtype, annotations required). Splits that do not require annotations are
# annotated exactly when their annotations file exists.
SPLITS: dict[str, tuple[str, bool]] = {
    "train2014": ("train2014", True),
    "val2014": ("val2014", True),
    "test-dev2015": ("test2015", False),
    "test2015": ("test2015", False),
}


@dataclass(frozen=True)
class SplitLayout:
    """Where one split's files live under a data root (``annotations`` None: no answers)."""

    questions: Path
    annotations: Path | None
    image_dir: Path
    image_subtype: str

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / f"COCO_{self.image_subtype}_{image_id:012d}.jpg"


def _check_split(split: str) -> tuple[str, bool]:
    if split not in SPLITS:
        raise ValueError(f"unknown VQA v2 split {split!r}; expected one of {sorted(SPLITS)}")
    return SPLITS[split]


def annotations_path(root: str | Path, split: str) -> Path:
    """Where ``split``'s annotations file lives, or would (a writer's target), whether or not
    it exists."""
    _check_split(split)
    return Path(root) / "Annotations" / f"v2_mscoco_{split}_annotations.json"


def split_layout(root: str | Path, split: str) -> SplitLayout:
    """Paths of ``split`` under ``root``; unknown split names fail with the list of known ones.

    ``annotations`` is always the path for train/val (a missing file is the loader's error to
    report), and for test splits the path if that file exists, else None: questions only.
    """
    subtype, required = _check_split(split)
    root = Path(root)
    annotations = annotations_path(root, split)
    return SplitLayout(
        questions=root / "Questions" / f"v2_OpenEnded_mscoco_{split}_questions.json",
        annotations=annotations if required or annotations.is_file() else None,
        image_dir=root / "Images" / "mscoco" / subtype,
        image_subtype=subtype,
    )
