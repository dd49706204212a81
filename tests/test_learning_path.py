"""The learning path through README and notebooks 01-05 holds together.

A learner installs the ``notebook`` extra and opens notebook 01 with the command the README gives right
after its two set-up commands; the math renders in Jupyter and on GitHub (MathJax without the textmacros
extension prints the backslash of ``\\text{kd\\_rate}``); one notation table, in notebook 01, is the one the
others link to, and the clashes it removed stay removed (a bare lambda meant both kd_rate and the skew KLs'
weight, T both the temperature and the sequence length); and each of notebooks 01-05 ends with 3 to 5
questions whose answers are folded and whose links reach an existing exercise heading of notebook 06.
Everything is read from the files; nothing is executed.
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PATH = ["01_divergences", "02_gradients", "03_backprop_by_hand", "04_tiny_distillation", "05_llama_by_hand"]
EXERCISES = ROOT / "notebooks" / "06_exercises.ipynb"
MATH = re.compile(r"\$\$(.+?)\$\$|\$([^$\n]+?)\$", re.S)


def _markdown_cells(name):
    nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text(encoding="utf-8"))
    return ["".join(cell["source"]) for cell in nb["cells"] if cell["cell_type"] == "markdown"]


def _readme_text():
    """README without its fenced code blocks and inline code (no math there)."""
    text = re.sub(r"```.*?```", "", README.read_text(encoding="utf-8"), flags=re.S)
    return re.sub(r"`[^`]*`", "", text)


def _math_spans(text):
    text = re.sub(r"`[^`]*`", "", text)
    return [m.group(1) or m.group(2) for m in MATH.finditer(text)]


def _documents():
    """(name, text) of README and of every markdown cell of notebooks 01-05."""
    docs = [("README.md", _readme_text())]
    for name in PATH:
        docs += [(name, text) for text in _markdown_cells(name)]
    return docs


def _jupyter_anchor(heading):
    """The id JupyterLab gives a markdown heading: its text with spaces as hyphens."""
    return heading.strip().replace(" ", "-")


def test_notebook_extra_installs_a_front_end():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = [re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower() for req in extras["notebook"]]
    assert "jupyterlab" in names, f"the notebook extra installs no front end: {extras['notebook']}"


def test_readme_opens_notebook_01_right_after_the_set_up_commands():
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 2, "README has fewer than two bash blocks"
    setup, after = blocks[0], blocks[1]
    assert "minitodi demo" in setup and "python -m pytest" in setup, "the two set-up commands moved"
    assert "pip install -e '.[notebook]'" in after, f"the block after set-up installs no extra:\n{after}"
    opened = re.search(r"jupyter lab (\S+\.ipynb)", after)
    assert opened, f"the block after set-up opens no notebook:\n{after}"
    assert opened.group(1) == "notebooks/01_divergences.ipynb"
    assert (ROOT / opened.group(1)).is_file()


def test_math_has_no_escapes_inside_text():
    """Inside \\text{...} MathJax reads no macro unless textmacros is loaded: a backslash shows as is."""
    broken = [(name, span) for name, text in _documents() for span in _math_spans(text)
              if re.search(r"\\text\{[^}]*\\", span)]
    assert not broken, f"\\text{{...}} with a backslash inside renders it literally: {broken[:3]}"


def test_one_notation_table_in_notebook_01_that_the_others_link():
    cells = _markdown_cells("01_divergences")
    tables = [text for text in cells if text.startswith("## Notation")]
    assert len(tables) == 1, "notebook 01 has no (or more than one) Notation section"
    rows = [line for line in tables[0].splitlines() if line.startswith("| $")]
    for symbol in [r"$\tau$", r"$\lambda_{\mathrm{kd}}$", r"$\lambda_{\mathrm{skew}}$", r"$\theta$", r"$L$",
                   r"$B$, $T$, $C$", r"$a_v$", r"$t$, $s$", r"$\rho$"]:
        assert any(row.startswith(f"| {symbol}") for row in rows), f"no row of the table is {symbol}"
    for name in PATH[1:]:
        assert any("*Notation*" in t and "01_divergences.ipynb" in t for t in _markdown_cells(name)), name
    assert "*Notation*" in _readme_text() and "01_divergences.ipynb" in README.read_text(encoding="utf-8")


# the clashes the table removed: lambda alone (kd_rate or skew weight?), T as a temperature (it is the
# sequence length of notebooks 03 and 05)
CLASHES = {
    "a bare lambda": r"\\lambda(?!_)",
    "T as the temperature": r"/\s*T(?![A-Za-z])|(?<![A-Za-z\\])T\^2|\\frac\{1\}\{N?\s*T\}|\{\(T\)\}",
}


@pytest.mark.parametrize("clash", CLASHES)
def test_notation_clashes_stay_removed(clash):
    found = [(name, span[:80]) for name, text in _documents() for span in _math_spans(text)
             if re.search(CLASHES[clash], span)]
    assert not found, f"{clash} in: {found[:3]}"


def _exercise_anchors():
    nb = json.loads(EXERCISES.read_text(encoding="utf-8"))
    headings = [line.lstrip("#").strip() for cell in nb["cells"] if cell["cell_type"] == "markdown"
                for line in "".join(cell["source"]).splitlines() if line.startswith("#")]
    return {_jupyter_anchor(h) for h in headings}


@pytest.mark.parametrize("name", PATH)
def test_questions_end_each_notebook_and_link_notebook_06(name):
    cells = _markdown_cells(name)
    questions = [text for text in cells if text.startswith("## Questions")]
    assert len(questions) == 1, f"{name} has no (or more than one) Questions section"
    assert cells.index(questions[0]) == len(cells) - 1, f"{name}: the questions are not its last section"
    parts = re.split(r"\n\*\*\d+\.\*\*", questions[0])[1:]  # one part per question, with its answer
    assert 3 <= len(parts) <= 5, f"{name} has {len(parts)} questions"
    anchors = _exercise_anchors()
    for number, part in enumerate(parts, start=1):
        assert "<details><summary>Answer</summary>" in part and "</details>" in part, f"{name} Q{number}"
        linked = re.findall(r"\]\(06_exercises\.ipynb#([^)\s]+)\)", part.split("<details>")[0])
        assert linked, f"{name} question {number} links no exercise of notebook 06"
        for anchor in linked:
            assert anchor in anchors, f"{name} question {number}: #{anchor} is no heading of notebook 06"
