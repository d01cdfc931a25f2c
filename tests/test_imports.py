"""The package's shape, read from its source with `ast`: no import circle, no import up a floor.

Floors, bottom first (a module may import only from its own floor or the floors below):
1 errors, config, config_io, checkpoint, images, viz; 2 tokenizer, models/; 3 inference/; 4 data/;
5 training/, evaluation/; 6 serve/; 7 cli, demo, __main__, and the package itself.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dalle"
FLOORS = {
    "errors": 1, "config": 1, "config_io": 1, "checkpoint": 1, "images": 1, "viz": 1, "outputs": 1,
    "tokenizer": 2, "models": 2,
    "inference": 3,
    "data": 4,
    "training": 5, "evaluation": 5,
    "serve": 6,
    "cli": 7, "commands": 7, "demo": 7, "__main__": 7, "": 7,
}
# Third-party packages a floor must never import (the inference path stays light).
FORBIDDEN = {"models": {"accelerate", "datasets"}, "inference": {"accelerate", "datasets"},
             "tokenizer": {"accelerate", "datasets"}, "serve": {"accelerate", "datasets"}}


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """dotted name -> file, for every module of the package (`dalle.models.dvae`, `dalle`, ...)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = ("dalle", *path.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(the package's modules `name` imports, the top-level third-party names it imports)."""
    is_package = path.name == "__init__.py"
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_package else name.split(".")[:-1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            if target.split(".")[0] != "dalle":
                outside.add(target.split(".")[0])
                continue
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name:
                inside.add(target)
    return inside, outside


def floor_of(name: str) -> tuple[str, int]:
    part = name.split(".")[1] if "." in name else ""
    return part, FLOORS[part]


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    known = modules(package)
    return {name: imports_of(name, path, known)[0] for name, path in known.items()}


def wrong_imports(package: Path = PACKAGE) -> list[str]:
    """Each import from a higher floor, and each forbidden third-party import, as a line."""
    known = modules(package)
    wrong = []
    for name, path in known.items():
        part, floor = floor_of(name)
        inside, outside = imports_of(name, path, known)
        for target in sorted(inside):
            if floor_of(target)[1] > floor:
                wrong.append(f"{name} (floor {floor}) imports {target} (floor {floor_of(target)[1]})")
        for third_party in sorted(outside & FORBIDDEN.get(part, set())):
            wrong.append(f"{name} imports {third_party}")
    return wrong


def test_every_module_has_a_floor():
    for name in modules():
        part = name.split(".")[1] if "." in name else ""
        assert part in FLOORS, f"{name} is on no floor: add it to FLOORS (and to the README's layout)"


def test_no_module_imports_from_a_higher_floor():
    wrong = wrong_imports()
    assert not wrong, "\n".join(wrong)


def find_cycle(edges: dict[str, set[str]], packages: frozenset[str] = frozenset()) -> list[str] | None:
    """One import circle as a list of modules, or None (depth-first search).

    Edges into `packages` (package roots) are ignored: `from dalle.data import shapes`
    names the package, not a circle."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if target in packages:
                continue
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_there_is_no_import_circle():
    packages = frozenset(name for name, path in modules().items() if path.name == "__init__.py")
    cycle = find_cycle(graph(), packages)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("edges, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set(), "c": {"b"}}, None),
])
def test_the_cycle_finder_finds_cycles(edges, expected):
    assert find_cycle(edges) == expected


def test_the_checker_sees_an_upward_import(tmp_path):
    """The floor test is not vacuous: a model importing the training loop or datasets is caught."""
    fake = tmp_path / "dalle"
    for sub in ("models", "training"):
        (fake / sub).mkdir(parents=True)
        (fake / sub / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "training" / "loop.py").write_text("import accelerate\nfrom dalle.models import dvae\n")
    (fake / "models" / "dvae.py").write_text("from ..training.loop import fit\nimport datasets\n")
    assert wrong_imports(fake) == ["dalle.models.dvae (floor 2) imports dalle.training.loop (floor 5)",
                                   "dalle.models.dvae imports datasets"]
    assert find_cycle(graph(fake)) == ["dalle.models.dvae", "dalle.training.loop", "dalle.models.dvae"]
