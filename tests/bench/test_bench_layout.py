"""The layout of ``lstmfast.bench``: the command line imports the modes, the modes import
``common`` and nothing of each other, ``common`` imports no mode, so there is no import
cycle; and what must run without torch (``--no-torch``, the help) imports without it."""

import ast
import importlib.util
import pathlib
import subprocess
import sys

import pytest

import lstmfast.bench

PACKAGE = pathlib.Path(lstmfast.bench.__file__).parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))
MODES = {"grid", "models", "peers", "variants", "patterns", "contention", "onnx_file"}
# What each module of the package may import of the package (at the top or inside a
# function): the command line imports the modes, a mode imports common (models also
# its models), common imports none of them.
ALLOWED = {"__init__": {"cli"}, "__main__": {"cli"}, "cli": MODES | {"common"}, "common": set(),
           "model_zoo": set(), **{mode: {"common"} for mode in MODES}}
ALLOWED["models"] = {"common", "model_zoo"}
TORCH_FREE = ("lstmfast.bench", "lstmfast.bench.cli", "lstmfast.bench.common", "lstmfast.bench.grid",
              "lstmfast.bench.peers", "lstmfast.bench.patterns", "lstmfast.bench.contention",
              "lstmfast.bench.onnx_file")


def package_imports(name):
    """The modules of lstmfast.bench that module ``name`` imports, wherever in it."""
    found = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t.split(".")[2] for t in targets if t.startswith("lstmfast.bench.")} & set(MODULES)
    return found


def test_every_module_is_accounted_for():
    assert set(MODULES) == set(ALLOWED)


@pytest.mark.parametrize("name", MODULES)
def test_imports_follow_the_dependency_direction(name):
    assert package_imports(name) <= ALLOWED[name], name


def test_there_is_no_import_cycle():
    graph = {name: package_imports(name) for name in MODULES}
    done, path = set(), []

    def visit(name):
        assert name not in path, f"import cycle: {' -> '.join(path + [name])}"
        if name in done:
            return
        path.append(name)
        for target in graph[name]:
            visit(target)
        path.pop()
        done.add(name)

    for name in MODULES:
        visit(name)


def _import_alone(module, block_torch=False):
    code = ("import sys\n" + ("sys.modules['torch'] = None\n" if block_torch else "")
            + f"import {module}\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@pytest.mark.parametrize("module", [f"lstmfast.bench.{m}" for m in MODULES if m != "__main__"]
                         + ["lstmfast.oracles"])
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    if module not in TORCH_FREE and importlib.util.find_spec("torch") is None:
        pytest.skip("imports torch")
    result = _import_alone(module)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("module", TORCH_FREE)
def test_the_torch_free_modules_import_without_torch(module):
    result = _import_alone(module, block_torch=True)
    assert result.returncode == 0, result.stderr
