"""The official VQA v2 file layout, shared by the loader, the synthetic generator and the checker.

::

    <root>/Questions/v2_OpenEnded_mscoco_<split>_questions.json
    <root>/Annotations/v2_mscoco_<split>_annotations.json        (train2014, val2014 only)
    <root>/Images/mscoco/<subtype>/COCO_<subtype>_%012d.jpg       (test-dev2015 -> test2015)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# split -> (image subtype, has annotations)
SPLITS: dict[str, tuple[str, bool]] = {
    "train2014": ("train2014", True),
    "val2014": ("val2014", True),
    "test-dev2015": ("test2015", False),
    "test2015": ("test2015", False),
}


@dataclass(frozen=True)
class SplitLayout:
    """Where one split's files live under a data root."""

    questions: Path
    annotations: Path | None
    image_dir: Path
    image_subtype: str

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / f"COCO_{self.image_subtype}_{image_id:012d}.jpg"


def split_layout(root: str | Path, split: str) -> SplitLayout:
    """Paths of ``split`` under ``root``; unknown split names fail with the list of known ones."""
    if split not in SPLITS:
        raise ValueError(f"unknown VQA v2 split {split!r}; expected one of {sorted(SPLITS)}")
    root = Path(root)
    subtype, annotated = SPLITS[split]
    return SplitLayout(
        questions=root / "Questions" / f"v2_OpenEnded_mscoco_{split}_questions.json",
        annotations=root / "Annotations" / f"v2_mscoco_{split}_annotations.json"
        if annotated
        else None,
        image_dir=root / "Images" / "mscoco" / subtype,
        image_subtype=subtype,
    )
