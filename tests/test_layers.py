"""The package's shape as a contract: one exception tree, one module of header names,
and layers that import only downwards and only public names (ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
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


@pytest.mark.parametrize("module", ["polybus", "polybus.aio", "polybus.patterns"])
@pytest.mark.parametrize("unwanted", ["polybus.log", "polybus.testing", "pytest"])
def test_importing_the_facade_does_not_load_the_engine_or_the_test_kit(
    module: str, unwanted: str
) -> None:
    import subprocess
    import sys

    code = (
        f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith({unwanted!r})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "[]", f"importing {module} loads {unwanted}: {loaded}"


# -- the import contract ------------------------------------------------------------------

#: each module's layer, by prefix (the longest prefix wins); a module imports only its own
#: layer and the ones below it
LAYERS = {
    "polybus.errors": 0,
    "polybus.types": 1,
    "polybus.envelope": 1,
    "polybus.model": 1,
    "polybus.codecs": 2,
    "polybus.message": 2,
    "polybus.middleware": 2,
    "polybus.log": 3,
    "polybus.adapters._support": 4,
    "polybus.adapters.base": 4,
    "polybus.adapters": 5,
    "polybus.registry": 6,
    "polybus.bus": 7,
    "polybus.patterns": 8,
    "polybus.sessions": 8,
    "polybus.otel": 8,
    "polybus.cloudevents": 8,
    "polybus.aio": 9,
    "polybus.cli": 9,
    "polybus.asyncapi": 9,
    "polybus": 9,  # the package's own __init__: re-exports
    "polybus.testing": 10,
}
CONCRETE_ADAPTERS = ("kafka", "native", "rabbitmq", "redis")


def layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise AssertionError(f"{module} has no layer: add it to LAYERS")


def unit(module: str) -> str:
    """The package a private name may be shared within: an adapter's package, a
    subpackage, or ``polybus`` for the top-level modules."""
    parts = module.split(".")
    if parts[:2] == ["polybus", "adapters"] and len(parts) > 2:
        return ".".join(parts[:3])
    if len(parts) > 2 or (len(parts) == 2 and (SRC / parts[1]).is_dir()):
        return ".".join(parts[:2])
    return "polybus"


def imports(module: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) of every polybus import in ``module``, lazy ones too."""
    path, tree = source(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [alias.name for alias in node.names]
            if target.startswith("polybus"):
                # `from . import native` imports a module: name it
                submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
                found += [(node.lineno, m, []) for m in submodules]
                if not submodules:
                    found.append((node.lineno, target, names))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("polybus")]
    return found


MODULES = set(modules())


def test_layers_import_only_downwards() -> None:
    upward = [
        f"{module}:{line} imports {target} (layer {layer(target)} > {layer(module)})"
        for module in MODULES
        for line, target, _ in imports(module)
        if layer(target) > layer(module)
    ]
    assert not upward, "\n".join(sorted(upward))


def test_no_module_imports_another_packages_private_names() -> None:
    private = [
        f"{module}:{line} imports {', '.join(n for n in names if n.startswith('_'))} from {target}"
        for module in MODULES
        for line, target, names in imports(module)
        if (unit(target) != unit(module) and any(n.startswith("_") for n in names))
        or (
            unit(target) != unit(module)
            and target.rpartition(".")[2].startswith("_")
            and not target.startswith("polybus.adapters._support")
        )
    ]
    assert not private, "\n".join(sorted(private))


def test_adapters_stand_alone_and_only_native_opens_the_engine() -> None:
    wrong = []
    for module in MODULES:
        for line, target, _ in imports(module):
            if target.startswith("polybus.log") and not module.startswith(
                (
                    "polybus.log",
                    "polybus.adapters.native",
                    "polybus.adapters._support",  # opens the log for the native store and inbox
                    "polybus.sessions",  # the native session store, on the engine's public API
                    "polybus.patterns",  # the native inbox, likewise
                    "polybus.cli",
                    "polybus.testing",
                )
            ):
                wrong.append(f"{module}:{line} imports the engine ({target})")
            if target.startswith("polybus.log.") and unit(module) != "polybus.log":
                wrong.append(f"{module}:{line} imports the engine's insides ({target})")
            for name in CONCRETE_ADAPTERS:
                adapter = f"polybus.adapters.{name}"
                if (
                    target.startswith(adapter)
                    and unit(module) != adapter
                    and (module.startswith(("polybus.adapters", "polybus.patterns", "polybus.bus")))
                ):
                    wrong.append(f"{module}:{line} imports the {name} adapter")
    assert not wrong, "\n".join(sorted(wrong))


def test_named_tuples_are_built_fast_only_through_the_checked_constructor() -> None:
    from polybus.types import Receipt, tuple_new

    with pytest.raises(TypeError, match="Receipt has 3 fields, not 4"):
        tuple_new(Receipt, 4)
    unchecked = [
        f"{path.relative_to(SRC)}"
        for path in SRC.rglob("*.py")
        if "tuple.__new__" in path.read_text() and path.name != "types.py"
    ]
    assert not unchecked, f"use polybus.types.tuple_new, which checks the field count: {unchecked}"


def test_a_module_over_600_lines_says_why_at_its_top() -> None:
    long = [
        f"{path.relative_to(SRC)} ({count} lines)"
        for path in SRC.rglob("*.py")
        if (count := len(path.read_text().splitlines())) > 620  # about 600
        and not re.search(
            r"Over \d+ lines",
            (ast.get_docstring(ast.parse(path.read_text())) or "") + path.read_text()[:300],
        )
    ]
    assert not long, f"split these, or say 'Over N lines because ...' at their top: {long}"


NAMED_TUPLE_API = {"_replace", "_fields", "_asdict", "_make", "_field_defaults"}


def private_names_defined(tree: ast.Module) -> set[str]:
    """The ``_names`` a module defines: functions, classes, attributes it assigns,
    module globals and slots."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names.add(target.id)
                if getattr(target, "id", "") == "__slots__" and isinstance(node.value, ast.Tuple):
                    names.update(e.value for e in node.value.elts if isinstance(e, ast.Constant))
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def third_party_names(tree: ast.Module) -> set[str]:
    """Names a module binds to a client library's objects (imports and their aliases)."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if not node.module.startswith("polybus"):
                names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    for node in tree.body:  # one level of aliases: _E = KafkaError
        if isinstance(node, ast.Assign) and getattr(node.value, "id", None) in names:
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def test_nothing_reaches_for_another_packages_private_attributes() -> None:
    trees = {module: source(module)[1] for module in MODULES}
    defined: dict[str, set[str]] = {}
    for module, tree in trees.items():
        defined.setdefault(unit(module), set()).update(private_names_defined(tree))
    reaching = []
    for module, tree in trees.items():
        own, foreign = defined[unit(module)], third_party_names(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            base = node.value
            while isinstance(base, ast.Attribute | ast.Call | ast.Subscript):
                base = base.func if isinstance(base, ast.Call) else base.value
            if (
                node.attr.startswith("__")
                or node.attr in NAMED_TUPLE_API | own
                or (isinstance(base, ast.Name) and base.id in {"self", "cls", "super", *foreign})
            ):
                continue
            owners = sorted(u for u, names in defined.items() if node.attr in names)
            if owners:
                reaching.append(f"{module}:{node.lineno} {ast.unparse(node)} ({owners})")
    assert not reaching, "\n".join(sorted(reaching))


#: adapter package -> (its client library, the one module allowed its private names)
CLIENT_HOOKS = {
    "polybus.adapters.rabbitmq": ("pika", "polybus.adapters.rabbitmq.pika_hooks"),
    "polybus.adapters.kafka": ("confluent_kafka", None),
    "polybus.adapters.redis": ("redis", None),
}


def client_private_names(library: str) -> set[str]:
    """The ``_names`` a client library's Python source defines."""
    package = importlib.import_module(library)
    names: set[str] = set()
    for path in Path(package.__file__ or "").parent.rglob("*.py"):
        names |= private_names_defined(ast.parse(path.read_text(), str(path)))
    return names


@pytest.mark.parametrize("adapter", sorted(CLIENT_HOOKS))
def test_only_the_hooks_module_touches_its_client_librarys_private_names(adapter: str) -> None:
    library, hooks = CLIENT_HOOKS[adapter]
    pytest.importorskip(library)
    ours = set().union(
        *(
            private_names_defined(source(m)[1])
            for m in MODULES
            if m.startswith(adapter) and m != hooks
        ),
        *(private_names_defined(source(m)[1]) for m in MODULES if unit(m) == "polybus"),
    )
    theirs = client_private_names(library) - ours
    touching = [
        f"{module}:{node.lineno} {ast.unparse(node)}"
        for module in MODULES
        if module.startswith(adapter) and module != hooks
        for node in ast.walk(source(module)[1])
        if isinstance(node, ast.Attribute) and node.attr in theirs
    ]
    assert not touching, f"move these behind {hooks or 'one hooks module'}:\n" + "\n".join(touching)
