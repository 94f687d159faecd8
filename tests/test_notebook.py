"""The demo notebook runs top to bottom (tiny sizes via DEMO_SIZE) and shows what it promises:
data, a trained checkpoint, the evaluation table and files, and attention figures."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import ROOT

NOTEBOOK = ROOT / "notebooks" / "demo.ipynb"


def outputs_of(cell: nbformat.NotebookNode, kind: str) -> list[str]:
    """Texts of a code cell's stream outputs, or the data types of its displayed outputs."""
    if kind == "stream":
        return [o["text"] for o in cell.outputs if o["output_type"] == "stream"]
    return [t for o in cell.outputs if o["output_type"] == "display_data" for t in o["data"]]


def test_demo_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1 and "DEMO_SIZE" in parameters[0].source
    # the kernel inherits this environment
    monkeypatch.setenv("DEMO_SIZE", "tiny")
    monkeypatch.setenv("DEMO_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()

    code = [c for c in notebook.cells if c.cell_type == "code"]
    printed = "".join(text for c in code for text in outputs_of(c, "stream"))
    assert "best checkpoint:" in printed
    # the evaluation wrote its EvalAI results and metrics, and showed the accuracy table
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    results = json.loads((tmp_path / "eval" / metrics["results_file"]).read_text())
    assert len(results) == metrics["num_questions"] > 0
    html = "".join(
        o["data"].get("text/html", "") + o["data"].get("text/plain", "")
        for c in code
        for o in c.outputs
        if o["output_type"] == "display_data"
    )
    assert "VQA accuracy on val2014" in html + printed
    assert f"{metrics['overall']:.2f}" in html + printed
    # one attention figure per answer type, rendered as images
    attention_cell = next(c for c in code if "plot_attention(image, prediction)" in c.source)
    assert outputs_of(attention_cell, "display").count("image/png") == 3
    assert (
        sum("->" in line for line in "".join(outputs_of(attention_cell, "stream")).splitlines())
        == 3
    )
