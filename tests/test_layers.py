"""The import rules of docs/ARCHITECTURE.md: each room imports only the rooms below it."""

import ast
from pathlib import Path

import lmlab

ROOT = Path(lmlab.__file__).parent
# room -> the rooms it may import (besides itself)
ALLOWED = {
    "configs": set(), "files": set(), "lazy": set(),
    "tokenizers": {"configs", "files", "lazy"},
    "data": {"configs", "files", "lazy"},
    "models": {"configs", "files", "lazy", "tokenizers", "data"},
    "eval": {"configs", "files", "lazy", "data", "models", "tokenizers"},
    "train": {"configs", "files", "lazy", "data", "models", "tokenizers", "eval"},
    "interop": {"configs", "files", "lazy", "data", "models", "tokenizers", "train", "eval"},
    "tune": {"configs", "files", "lazy", "data", "models", "tokenizers", "train", "eval", "interop"},
    "lab": {"configs", "files", "lazy", "data", "models", "tokenizers", "train", "eval", "tune"},
    "server": {"configs", "files", "data", "models", "tokenizers", "train", "interop", "lab", "tune", "eval",
               "__init__"},
    "cli": {"configs", "files", "data", "models", "tokenizers", "train", "interop", "lab", "tune", "server", "eval",
            "__init__"},
    "__init__": {"lazy", "models", "tokenizers", "train", "data"},
}


def room(parts: tuple[str, ...]) -> str:
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def imported_rooms(path: Path) -> set[str]:
    """The lmlab rooms a module imports, by relative or absolute import."""
    parts = path.relative_to(ROOT).parts
    package = list(parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
                if not target:  # `from .. import x` at the top: x is a room, or a name of lmlab/__init__.py
                    out |= {a.name if a.name in ALLOWED else "__init__" for a in node.names}
                    continue
            elif node.module and node.module.split(".")[0] == "lmlab":
                target = node.module.split(".")[1:]
            else:
                continue
            if target:
                out.add(target[0])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lmlab.")}
    return out


def test_every_room_imports_only_the_rooms_below_it():
    broken = []
    for path in sorted(ROOT.rglob("*.py")):
        src = room(path.relative_to(ROOT).parts)
        assert src in ALLOWED, f"{path}: a new room? add it to docs/ARCHITECTURE.md and ALLOWED"
        for target in imported_rooms(path) - {src}:
            if target not in ALLOWED[src]:
                broken.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not broken, broken


def test_the_check_sees_imports():
    found = imported_rooms(ROOT / "server" / "jobs.py")
    assert {"models", "train"} <= found and "cli" not in found
