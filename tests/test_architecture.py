"""The structure drawn from the package's own imports matches docs/architecture.md: arrows point down the layers,
no import circle, no private name imported across files, and no file or function past its size limit.

Every import is read with `ast`, lazy imports inside functions and `TYPE_CHECKING` blocks included."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "diffusion_kto"
MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 60


def layers() -> dict[str, int]:
    """Room -> layer height (0 = the bottom), from the ```layers block of docs/architecture.md (top layer first)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ```layers block"
    lines = [line.split() for line in block.group(1).splitlines() if line.strip()]
    return {room: len(lines) - 1 - height for height, (_, *rooms) in enumerate(lines) for room in rooms}


def module_name(path: Path) -> str:
    """diffusion_kto.x.y for src/diffusion_kto/x/y.py (a package's __init__ is the package)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def room(module: str) -> str:
    """The top-level room of a module: diffusion_kto.train.trainer -> train; the package itself -> diffusion_kto."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import of ours in a module, lazy ones included."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "diffusion_kto"]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target.split(".")[0] != "diffusion_kto":
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            found += [(s, [], node.lineno) for s in submodules]
            rest = [n for n in names if f"{target}.{n}" not in MODULES]
            if rest or not submodules:
                found.append((target, rest, node.lineno))
    return found


def test_every_room_has_a_layer():
    known = layers()
    missing = sorted({room(m) for m in MODULES} - set(known))
    assert not missing, f"rooms without a layer in docs/architecture.md: {missing}"


def test_arrows_point_down():
    height = layers()
    upward = [f"{m}:{line} imports {t} ({room(m)} is below {room(t)})" for m in MODULES for t, _, line in imports(m)
              if room(m) in height and room(t) in height  # a room without a layer fails the test above
              and height[room(t)] > height[room(m)]]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_circle():
    graph = {m: sorted({t for t, _, _ in imports(m) if t in MODULES and t != m}) for m in MODULES}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_no_private_name_imported_across_files():
    private = [f"{m}:{line} takes {n} from {t}" for m in MODULES for t, names, line in imports(m)
               for n in names if n.startswith("_") and t != m]
    assert not private, "\n".join(private)


def test_sizes():
    too_long = []
    for module, path in MODULES.items():
        source = path.read_text()
        if (n := len(source.splitlines())) > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {n} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, f"over {MAX_FILE_LINES} lines a file or {MAX_FUNCTION_LINES} a function:\n" + "\n".join(too_long)


@pytest.mark.parametrize("source, expected", [
    ("from .. import losses", ["diffusion_kto.losses"]),
    ("from ..models.base import Conditioning", ["diffusion_kto.models.base"]),
    ("def f():\n    from ..train import DiffusionKTOTrainer", ["diffusion_kto.train"]),
])
def test_the_checker_reads_relative_and_lazy_imports(tmp_path, monkeypatch, source, expected):
    """The walker resolves relative imports against the module's package and sees imports inside functions."""
    monkeypatch.setitem(MODULES, "diffusion_kto.objectives.probe", tmp_path / "probe.py")
    (tmp_path / "probe.py").write_text(source)
    assert [t for t, _, _ in imports("diffusion_kto.objectives.probe")] == expected
