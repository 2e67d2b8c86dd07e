"""Every module imports on its own: no import cycle hides behind the order in which the package loads them."""

import subprocess
import sys

from tests.conftest import REPO

# in one interpreter (torch and transformers stay loaded), each module of moefy and moefy_kernels is imported
# with every moefy module forgotten first, as a fresh `python -c "import X"` would import it
SCRIPT = r"""
import importlib, pathlib, sys
failed = []
modules = sorted(".".join(p.with_suffix("").parts) for package in ("moefy", "moefy_kernels")
                 for p in pathlib.Path(package).rglob("*.py") if p.name != "__main__.py")
for module in (m.removesuffix(".__init__") for m in modules):
    for name in [n for n in sys.modules if n.split(".")[0] in ("moefy", "moefy_kernels")]:
        del sys.modules[name]
    try:
        importlib.import_module(module)
    except Exception as exc:
        failed.append(f"{module}: {type(exc).__name__}: {exc}")
print(len(modules))
print("\n".join(failed))
"""


def test_every_module_imports_on_its_own():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    count, *failed = done.stdout.strip().split("\n")
    assert int(count) > 50 and failed == [], "\n".join(failed)
