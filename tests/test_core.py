"""minitodi.core is the math alone: it imports nothing else of minitodi and runs no threads.

And importing any of minitodi changes nothing process-wide: no environment variable (threadpoolctl, which
sets one when imported, is imported at the first use of BLAS threads), no malloc setting
(tests/test_parallel.py).
"""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import minitodi
from minitodi import core

CORE = Path(core.__file__).parent
# what the math may import besides its own modules: the standard library's plain tools and NumPy
ALLOWED = {"math", "numbers", "functools", "dataclasses", "collections", "types", "os", "numpy", "cupy"}


def _imports(path):
    """(module, level) of every import statement in the file at ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def test_core_imports_nothing_of_minitodi_outside_core_and_no_threads():
    files = sorted(CORE.glob("*.py"))
    assert {f.stem for f in files} >= {"device", "layers", "losses", "model", "optim", "gradcheck"}
    for path in files:
        for module, level in _imports(path):
            where = f"{path.name} imports {'.' * level}{module}"
            assert level <= 1, where  # `from .x`: inside core; `from ..x` would reach the rest of minitodi
            if level == 0:
                assert module.split(".")[0] in ALLOWED, where  # minitodi, threading, concurrent: never


def test_the_core_imports_alone():
    """In a fresh interpreter, importing every core module loads no other minitodi module."""
    code = ("import sys, minitodi.core.device, minitodi.core.layers, minitodi.core.losses, "
            "minitodi.core.model, minitodi.core.optim, minitodi.core.gradcheck\n"
            "print(sorted(m for m in sys.modules if m.startswith('minitodi')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    outside = [m for m in eval(loaded) if m != "minitodi" and not m.startswith("minitodi.core")]
    assert outside == [], outside


IMPORT_EVERYTHING = """
import importlib, os, pkgutil, sys
import minitodi
before = dict(os.environ)
names = [m.name for m in pkgutil.walk_packages(minitodi.__path__, "minitodi.")]
names = [name for name in names if name != "minitodi.__main__"]  # running it is the command line
for name in names:
    importlib.import_module(name)
changed = {k: os.environ.get(k) for k in set(os.environ) | set(before) if os.environ.get(k) != before.get(k)}
assert not changed, changed
assert "threadpoolctl" not in sys.modules, "threadpoolctl imported with minitodi"
print(len(names))
"""


def test_importing_minitodi_changes_no_environment_variable():
    out = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    modules = [m.name for m in pkgutil.walk_packages(minitodi.__path__, "minitodi.")]
    assert int(out.stdout) == len(modules) - 1 > 20
