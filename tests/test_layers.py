"""The import-layer rule (docs/architecture.md): rooms depend downwards only.

cli -> apps -> (train, evaluate, generation, hub, serve) -> models -> (tokenizers, data) -> (utils, options, viz);
``errors`` is usable by every room. Every import is checked, including those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lmforge

SRC = Path(lmforge.__file__).parent
# room -> level (higher may import lower or equal-level siblings' public API; never higher)
LEVELS = {"cli": 6, "__main__": 6, "__init__": 6, "apps": 5,
          "train": 4, "evaluate": 4, "generation": 4, "hub": 4, "serve": 4,
          "models": 3, "tokenizers": 2, "data": 2, "utils": 1, "options": 1, "viz": 1, "kernels": 1, "errors": 0}


def room_of(module: str) -> str:
    """'lmforge.models.gpt' -> 'models'; 'lmforge' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("lmforge")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("lmforge"):
                if target == "lmforge":  # `from lmforge import x` / `from .. import x`: x is a room
                    out += [(node.lineno, f"lmforge.{a.name}") for a in node.names]
                else:
                    out.append((node.lineno, target))
    return out


def test_rooms_import_downwards_only() -> None:
    bad = []
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 30
    for path in files:
        here = room_of(module_name(path)) if path.parent != SRC else path.stem
        assert here in LEVELS, f"{path} is in no room; add it to LEVELS and docs/architecture.md"
        for line, target in imported_modules(path):
            there = room_of(target)
            if there == "__version__":
                continue
            if LEVELS.get(there, 99) > LEVELS[here]:
                bad.append(f"{path.relative_to(SRC)}:{line} ({here}) imports {target} ({there})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_layer_walker_sees_function_local_imports(tmp_path: Path) -> None:
    src = "def f():\n    from ..apps import chat\n"
    p = SRC / "models" / "_probe.py"
    tree = ast.parse(src)
    found = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert found and found[0].level == 2 and found[0].module == "apps"
    assert room_of("lmforge.apps.chat") == "apps" and LEVELS["apps"] > LEVELS[room_of(module_name(p))]
