"""The teaching parts of notebooks 00–08: a paper pointer, two checked exercises, a takeaway.

Whether each exercise's answer is right is checked inside the notebook (its check cell compares the
answer with the library and raises otherwise), so executing the notebooks (nbval, papermill) runs
those checks. This file keeps the structure from rotting without executing anything: an answer
cell must fall back to a solution defined *earlier* in a hidden cell, and its check cell must come
after it and assert something about that answer.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")

ROOT = Path(__file__).resolve().parents[1]
TEACHING = sorted(p.stem for p in (ROOT / "notebooks").glob("0[0-8]_*.py"))


def test_the_nine_teaching_notebooks():
    assert [n[:2] for n in TEACHING] == [f"0{i}" for i in range(9)]


@pytest.mark.parametrize("name", TEACHING)
def test_paper_pointer_exercises_takeaway(name):
    cells = jupytext.read(ROOT / "notebooks" / f"{name}.py").cells

    # the paper pointer: in the first markdown cell, naming an equation, figure, table or algorithm,
    # with the symbols' page, which exists
    first = cells[0].source
    pointer = [line for line in first.splitlines() if line.startswith("**In the paper:**")]
    assert len(pointer) == 1, name
    assert re.search(r"\b(Eq\.|Figure|Table|Algorithm) ?\d", first.split("**In the paper:**")[1]), first
    assert "docs/method.md" in first and (ROOT / "docs" / "method.md").is_file()

    # one hidden solution cell defining _solution_1 and _solution_2
    hidden = [i for i, c in enumerate(cells) if "solution" in c.metadata.get("tags", [])]
    assert len(hidden) == 1, name
    sol = cells[hidden[0]]
    assert sol.metadata.get("jupyter", {}).get("source_hidden") is True and sol.metadata.get("cellView") == "form"
    defined = {n.name for n in ast.parse(sol.source).body if isinstance(n, ast.FunctionDef)}
    assert {"_solution_1", "_solution_2"} <= defined, defined

    code = [(i, c.source) for i, c in enumerate(cells) if c.cell_type == "code"]
    for k in (1, 2):
        # the answer cell: a placeholder, then the solution only when the placeholder was left as is
        (answer,) = [i for i, src in code if re.search(rf"^answer_{k} = None\b", src, re.M)]
        src = cells[answer].source
        assert answer > hidden[0] and f"if answer_{k} is None:\n    answer_{k} = _solution_{k}(" in src, src
        # the check: the next code cell, asserting on the answer and printing "correct"
        check = next(i for i, _ in code if i > answer)
        body = cells[check].source
        assert f"answer_{k}" in body and "assert" in body, body
        assert 'print(f"correct' in body or 'print("correct")' in body, body
        assert "_solution" not in body  # the check does not reuse the solution's code path
        # an exercise statement before the answer cell
        assert any(f"**Exercise {k}" in cells[j].source for j in range(answer) if cells[j].cell_type == "markdown")

    # the takeaway: a markdown cell after the exercises, before the recording cell, which stays last
    takeaway = [i for i, c in enumerate(cells) if c.cell_type == "markdown" and "## Takeaway" in c.source]
    assert len(takeaway) == 1 and takeaway[0] > hidden[0]
    section = cells[takeaway[0]].source.split("## Takeaway")[1].split("\n## ")[0]  # up to the next heading
    bullets = [line for line in section.splitlines() if line.startswith("* ")]
    assert 3 <= len(bullets) <= 5, bullets
    assert "results_path" in cells[-1].source and cells[-1].cell_type == "code"
