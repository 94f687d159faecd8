"""The data side never reaches into the model: no module under vqa/data imports vqa.models.

What the data side needs of the model (the tokenizer choice, the visual encoder's description)
is handed over by the entry points, so the package can be read, tested and reused alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

DATA_PACKAGE = Path(__file__).resolve().parents[1] / "vqa" / "data"
FORBIDDEN = "vqa.models"


def imported_modules(path: Path, package_dir: Path = DATA_PACKAGE) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path`` (a file under ``package_dir``, the folder of
    vqa.data), relative imports resolved, those under ``if TYPE_CHECKING:`` and inside
    functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..models import y
                package = ["vqa", "data", *path.relative_to(package_dir).parent.parts]
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def test_the_scan_sees_every_kind_of_import(tmp_path: Path) -> None:
    package = tmp_path / "vqa" / "data"
    (package / "sub").mkdir(parents=True)
    source = package / "probe.py"
    source.write_text(
        "import vqa.models.visual\n"
        "from vqa.models import text\n"
        "from .. import models\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from vqa.models.vqa_model import VQAModel\n"
        "def late():\n"
        "    from ..models.head import MLPHead\n"
        "from vqa.data.table import column\n"
        "from . import features\n",
        encoding="utf-8",
    )
    nested = package / "sub" / "deeper.py"
    nested.write_text("from ...models import visual\nfrom .. import tokenizer\n", encoding="utf-8")

    def hits(path: Path) -> set[int]:
        return {line for line, m in imported_modules(path, package) if m.startswith(FORBIDDEN)}

    assert hits(source) == {1, 2, 3, 6, 8}
    assert hits(nested) == {1}


def test_no_data_module_imports_the_models() -> None:
    sources = sorted(DATA_PACKAGE.rglob("*.py"))
    assert len(sources) > 10  # the scan really looked at the package
    offenders = [
        f"{path.relative_to(DATA_PACKAGE.parent.parent)}:{line} imports {module}"
        for path in sources
        for line, module in imported_modules(path)
        if module == FORBIDDEN or module.startswith(FORBIDDEN + ".")
    ]
    assert not offenders, "vqa/data must not depend on vqa/models:\n" + "\n".join(offenders)
