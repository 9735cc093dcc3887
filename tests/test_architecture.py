"""The package's layout rules (docs/architecture.md): what may import what, no import cycle (imports
inside functions included), module and function sizes, and the CLI's error handling."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "repguide"

# Each unit (a top-level module or subpackage of repguide) and its layer: a unit may import only
# units of lower layers. Keep in step with the table in docs/architecture.md.
LAYERS: dict[str, int] = {
    "errors": 0, "_registry": 0,
    "similarity": 1, "capture": 1, "runs": 1,
    "pairing": 2, "models": 2, "data": 2,
    "guidance": 3,
    "config": 4, "analysis": 4,
    "build": 5, "steps": 5, "claims": 5, "ledger": 5,
    "train": 6, "report": 6,
    "reproduce": 7,
    "cli": 8, "__init__": 8,
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    """Dotted name below repguide (``similarity.cka``, ``train``) → file."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every repguide module ``name`` imports, at any depth of its code (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                targets = [mod] + [f"{mod}.{a.name}".strip(".") for a in node.names]
            else:
                mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            targets = [t if t.startswith("repguide") or not node.level else f"repguide.{t}" for t in targets]
        else:
            continue
        for t in targets:
            if t == "repguide" or not t.startswith("repguide."):
                continue
            t = t.removeprefix("repguide.")
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test).endswith("TYPE_CHECKING"):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _unit(module: str) -> str:
    return module.split(".")[0]


def test_every_unit_of_the_package_has_a_layer():
    units = {_unit(m) for m in _modules()}
    assert units <= set(LAYERS), f"add to LAYERS and docs/architecture.md: {sorted(units - set(LAYERS))}"


def test_no_unit_imports_a_unit_of_its_own_or_a_higher_layer():
    wrong = []
    for module, targets in _graph().items():
        for target in targets:
            a, b = _unit(module), _unit(target)
            if a != b and a != "__init__" and LAYERS[b] >= LAYERS[a]:
                wrong.append(f"{module} (layer {LAYERS[a]}) imports {target} (layer {LAYERS[b]})")
    assert not wrong, "\n".join(wrong)


def _imported_names(name: str, path: Path) -> list[tuple[int, str]]:
    """Every ``repguide.x.y`` and ``repguide.x.y.name`` that ``name`` imports (line, dotted path
    below repguide), under ``if TYPE_CHECKING:`` too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
                mod = ".".join(["repguide", *base, *([mod] if mod else [])])
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return [(line, t.removeprefix("repguide.")) for line, t in found if t.startswith("repguide.")]


def test_no_unit_imports_a_private_name_of_another_unit():
    """A leading-underscore name (a module, function, class or constant: any part of the dotted
    path) is private to its unit, the top-level module or subpackage it is in: ``capture._hooks``
    and ``capture._hooks._Normaliser`` may be imported inside ``capture`` only. Another unit
    imports what the unit exports under a public name. The one exception is the unit
    ``_registry`` itself, a private module meant for every unit's registries. Dunder names
    (``__version__``) are not private."""
    wrong = []
    for module, path in _modules().items():
        for line, target in _imported_names(module, path):
            parts = target.split(".")
            private = [p for p in parts[1:] if p.startswith("_") and not p.startswith("__")]
            if parts[0].startswith("_") and parts[0] not in ("_registry", "__init__"):
                private.insert(0, parts[0])
            if private and parts[0] != _unit(module):
                wrong.append(f"{path.relative_to(SRC)}:{line} imports repguide.{target}")
    assert not wrong, "\n".join(wrong)


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):  # a package importing its own submodules
                continue
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            pytest.fail("import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]):]))


@pytest.mark.parametrize("module", sorted(_modules()))
def test_module_and_its_functions_are_small(module):
    path = _modules()[module]
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.name}: {len(text.splitlines())} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{module}: " + ", ".join(long)


def test_the_cli_turns_only_repguide_errors_known_os_errors_and_interrupts_into_one_line():
    tree = ast.parse((SRC / "cli.py").read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    for node in ast.walk(tree):  # elsewhere a handler may only turn an error into another one
        if isinstance(node, ast.ExceptHandler) and not any(node is h for h in ast.walk(main)):
            assert isinstance(node.body[-1], ast.Raise), f"cli.py:{node.lineno} swallows an exception"
    caught = set()
    for node in ast.walk(main):
        if isinstance(node, ast.ExceptHandler):
            assert node.type is not None, "a bare except in cli.py"
            names = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
            names = {n.id if isinstance(n, ast.Name) else ast.unparse(n) for n in names}
            if "Exception" in names:  # allowed only to annotate a bug and raise it again
                assert isinstance(node.body[-1], ast.Raise) and node.body[-1].exc is None
            caught |= names
    assert caught <= {"RepguideError", "OSError", "KeyboardInterrupt", "Exception"}, caught
    assert {"RepguideError", "KeyboardInterrupt"} <= caught


def test_source_cites_nothing_outside_the_repository():
    cites = [
        f"{path.relative_to(SRC)}:{i}"
        for path in SRC.rglob("*.py")
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if "paper.md" in line or "official-code.md" in line or "../shared" in line
    ]
    assert not cites, cites


def test_every_unit_is_in_docs_architecture_table_on_its_layer():
    doc = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| (\d+) \| `([\w.]+)` \|", doc, flags=re.M)
    assert {unit: int(layer) for layer, unit in rows} == LAYERS
