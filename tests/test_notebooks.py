"""Every notebook in notebooks/ executes top to bottom, and every script in examples/ runs.

Notebooks run in a fresh ``python3`` kernel through nbclient, with the notebook's own directory as
the working directory (that is how the notebooks find the package in a plain checkout) and a time
limit per cell; they are skipped, with the reason, when nbclient, nbformat or ipykernel is missing
(``pip install -e '.[notebook]'``). The saved copies must have been executed in order, so that the
outputs a reader sees on GitHub come from the code above them.

Examples run as ``python examples/NAME.py`` with no arguments, in a temporary working directory
(anything they write, such as a figure at its default path, lands there) and with MINITODI_FAST=1
in the environment: an example that would take more than a few seconds should read that variable
and do a smaller run. Both lists come from glob, so files added later are covered without editing
this module.
"""

import glob
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
    from minitodi.losses import LOSSES

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
