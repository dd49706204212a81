"""Every notebook in notebooks/ executes top to bottom, and every script in examples/ runs.

Notebooks run in a fresh ``python3`` kernel through nbclient, with the notebook's own directory as
the working directory (that is how the notebooks find the package in a plain checkout) and a time
limit per cell; they are skipped, with the reason, when nbclient, nbformat or ipykernel is missing
(``pip install -e '.[notebook]'``). The saved copies must have been executed in order, so that the
outputs a reader sees on GitHub come from the code above them.

A saved output that prints package source must print the package as it is now: for every code cell
that calls ``inspect.getsource(X)`` (or ``getsource(X)``) on a minitodi object, X is resolved through the
notebook's own minitodi imports (``from minitodi.core import model`` makes ``model.block_forward`` the
function ``minitodi.core.model.block_forward``) and its current source, whitespace normalised, must appear
in the cell's saved stream output. Nothing is executed for this check; a deliberately stale copy of a
notebook, written to a temporary directory, shows that it fails.

Examples run as ``python examples/NAME.py`` with no arguments, in a temporary working directory
(anything they write, such as a figure at its default path, lands there) and with MINITODI_FAST=1
in the environment: an example that would take more than a few seconds should read that variable
and do a smaller run. Both lists come from glob, so files added later are covered without editing
this module.
"""

import ast
import glob
import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(glob.glob(str(ROOT / "notebooks" / "*.ipynb")))
EXAMPLES = sorted(glob.glob(str(ROOT / "examples" / "*.py")))
CELL_TIMEOUT_S = 120


def _ids(paths):
    return [Path(p).name for p in paths]


def test_there_is_something_to_run():
    assert NOTEBOOKS, "no notebook found in notebooks/"
    assert EXAMPLES, "no script found in examples/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_saved_executed(path):
    nbformat = pytest.importorskip("nbformat", reason="nbformat missing: pip install -e '.[notebook]'")
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts, f"{path} has no code cell"
    assert counts == list(range(1, len(counts) + 1)), (
        f"{path} was not saved after one clean run top to bottom (execution counts {counts})")
    for cell in nb.cells:
        if cell.cell_type == "code":
            errors = [o for o in cell.outputs if o.output_type == "error"]
            assert not errors, f"{path} was saved with an error output: {errors[0].get('ename')}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_executes(path):
    nbformat = pytest.importorskip("nbformat", reason="nbformat missing: pip install -e '.[notebook]'")
    nbclient = pytest.importorskip("nbclient", reason="nbclient missing: pip install -e '.[notebook]'")
    pytest.importorskip("ipykernel", reason="ipykernel missing: pip install -e '.[notebook]'")
    pytest.importorskip("matplotlib", reason="matplotlib missing: pip install -e '.[notebook]'")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(Path(path).parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    ran = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in ran)


def _parse(source):
    """A code cell's syntax tree; lines of IPython magics and shell escapes (% and !) are left out."""
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    return ast.parse("\n".join(lines))


def _dotted(node):
    """``a.b.c`` for a chain of names and attributes, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _minitodi_names(cells):
    """{name the notebook binds: the minitodi module or object's dotted path}, from its import statements."""
    names = {}
    for cell in cells:
        for node in ast.walk(_parse(cell.source)):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
                if node.module.split(".")[0] == "minitodi":
                    for alias in node.names:
                        names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] != "minitodi":
                        continue
                    if alias.asname:
                        names[alias.asname] = alias.name
                    else:  # `import minitodi.core.model` binds the name minitodi
                        names["minitodi"] = "minitodi"
    return names


def _printed_sources(nb):
    """``(cell index, dotted path)`` of every minitodi object whose source a code cell prints.

    A cell prints source with ``inspect.getsource(X)`` or ``getsource(X)``; X is a name or attribute chain
    whose first name the notebook imported from minitodi. Other objects (a function the notebook defines
    itself) cannot go stale and are not listed.
    """
    cells = [c for c in nb.cells if c.cell_type == "code"]
    names = _minitodi_names(cells)
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or "getsource" not in cell.source:
            continue
        for node in ast.walk(_parse(cell.source)):
            is_call = isinstance(node, ast.Call) and _dotted(node.func) in ("getsource", "inspect.getsource")
            if not is_call or len(node.args) != 1:
                continue
            target = _dotted(node.args[0])
            if target is None:
                continue
            root, _, rest = target.partition(".")
            if root in names:
                found.append((i, ".".join(filter(None, [names[root], rest]))))
    return found


def _resolve(dotted):
    """The object at a dotted path: the longest importable prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"nothing in {dotted!r} can be imported")


def _normalised(text):
    return " ".join(text.split())


def _stale_sources(nb):
    """One line for every printed minitodi source that the cell's saved stream output does not show."""
    stale = []
    for i, dotted in _printed_sources(nb):
        shown = "".join(o.get("text", "") for o in nb.cells[i].outputs if o.output_type == "stream")
        if _normalised(inspect.getsource(_resolve(dotted))) not in _normalised(shown):
            stale.append(f"cell {i}: its saved output does not show the current source of {dotted}")
    return stale


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_printed_source_is_current(path):
    nbformat = pytest.importorskip("nbformat", reason="nbformat missing: pip install -e '.[notebook]'")
    stale = _stale_sources(nbformat.read(path, as_version=4))
    assert not stale, f"{Path(path).name} is stale, re-run it top to bottom: " + "; ".join(stale)


def test_stale_printed_source_fails(tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="nbformat missing: pip install -e '.[notebook]'")
    printing = [p for p in NOTEBOOKS if _printed_sources(nbformat.read(p, as_version=4))]
    assert printing, "no notebook prints package source: the source check has nothing to check"
    nb = nbformat.read(printing[0], as_version=4)
    i, dotted = _printed_sources(nb)[0]
    in_cell = [d for j, d in _printed_sources(nb) if j == i]
    copy = tmp_path / Path(printing[0]).name

    def saved_with(text):
        """The notebook's copy with cell i's output replaced by ``text``, as read back from disk."""
        nb.cells[i].outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
        nbformat.write(nb, copy)
        return nbformat.read(copy, as_version=4)

    current = [inspect.getsource(_resolve(d)) for d in in_cell]
    assert _stale_sources(saved_with("\n".join(current))) == []
    # the first function as it was before a line was deleted from it
    last_line = current[0].rstrip().splitlines()[-1]
    indent = last_line[:len(last_line) - len(last_line.lstrip())]
    older = current[0].replace(last_line, f"{indent}pass  # deleted since\n{last_line}")
    stale = _stale_sources(saved_with("\n".join([older, *current[1:]])))
    assert stale == [f"cell {i}: its saved output does not show the current source of {dotted}"]
    # a copy saved without the output
    assert len(_stale_sources(saved_with(""))) == len(in_cell)


def _run_example(path, tmp_path, *args):
    env = {**os.environ, "MINITODI_FAST": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, path, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
def test_example_runs(path, tmp_path):
    if "matplotlib" in Path(path).read_text():
        pytest.importorskip("matplotlib", reason="matplotlib missing: pip install -e '.[notebook]'")
    proc = _run_example(path, tmp_path)
    assert proc.returncode == 0, f"{Path(path).name} failed:\n{proc.stdout}\n{proc.stderr}"


def test_gradient_analysis_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib missing: pip install -e '.[notebook]'")
    out = tmp_path / "figure.png"
    proc = _run_example(str(ROOT / "examples" / "gradient_analysis.py"), tmp_path, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_check_gradients_reports_every_loss_and_fails_when_it_should(tmp_path):
    from minitodi.core.losses import LOSSES

    script = str(ROOT / "examples" / "check_gradients.py")
    proc = _run_example(script, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    for name in LOSSES:
        assert name in rows and rows[name].rstrip().endswith("ok"), proc.stdout
    # a tolerance nothing can meet must turn every row into a failure and the exit status into 1
    strict = _run_example(script, tmp_path, "--tol", "0")
    assert strict.returncode == 1
    assert strict.stdout.count("FAIL") == len(LOSSES)
