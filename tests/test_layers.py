"""The package's shape as a contract: one exception tree, one module of header names,
and layers that import only downwards and only public names (ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import polybus
import polybus.errors
from polybus.patterns import Retry

SRC = Path(polybus.__file__).parent
#: exceptions that never leave the module raising them
INTERNAL_SIGNALS = {"polybus.log.format.BadBatch"}


def modules() -> list[str]:
    names = ["polybus"]
    for info in pkgutil.walk_packages([str(SRC)], "polybus."):
        names.append(info.name)
    return sorted(names)


def source(module: str) -> tuple[Path, ast.Module]:
    relative = Path(*module.split(".")[1:])
    path = SRC / relative / "__init__.py" if (SRC / relative).is_dir() else SRC / f"{relative}.py"
    return path, ast.parse(path.read_text(), str(path))


def test_every_exception_lives_in_the_errors_module_and_its_tree() -> None:
    found = set()
    for name in modules():
        module = importlib.import_module(name)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__.startswith("polybus")
                and value is not Retry
            ):
                found.add(f"{value.__module__}.{value.__qualname__}")
    outside = {f for f in found if not f.startswith("polybus.errors.")} - INTERNAL_SIGNALS
    assert not outside, f"define these in polybus.errors and re-export them: {sorted(outside)}"
    tree = polybus.errors.__doc__ or ""
    for qualified in found - INTERNAL_SIGNALS:
        name = qualified.rpartition(".")[2]
        assert name in polybus.errors.__all__, f"{name} is missing from polybus.errors.__all__"
        assert f" {name}" in tree, f"{name} is missing from the tree drawn in polybus.errors"


def test_retry_is_a_signal_not_an_error() -> None:
    assert not issubclass(Retry, polybus.PolybusError)


def test_header_names_are_defined_only_in_the_envelope_module() -> None:
    elsewhere = []
    for name in modules():
        if name == "polybus.envelope":
            continue
        path, tree = source(name)
        for node in tree.body:
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
                and node.value.value.startswith("polybus-")
            ):
                elsewhere.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not elsewhere, f"move these header names to polybus/envelope.py: {elsewhere}"


@pytest.mark.parametrize("module", ["polybus", "polybus.aio"])
def test_importing_the_facade_does_not_load_the_engine(module: str) -> None:
    import subprocess
    import sys

    code = f"import sys, {module}; print(sorted(m for m in sys.modules if 'polybus.log' in m))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "[]", f"importing {module} loads the engine: {loaded}"
