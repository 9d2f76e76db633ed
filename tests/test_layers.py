"""The import rules of the package's layers, read from the source (AST), so the architecture cannot erode.

Each module belongs to a layer; a layer imports only from itself and the layers below it, and only the Lightning
layer and the examples import Lightning. Every import counts: top level, inside functions, under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_compress"

# lowest first: a module may import from its own layer and the layers before it
LAYERS = ["functional", "nn", "calibration", "export", "tools", "lightning", "examples", "package"]
# the layer of each top-level module or folder of the package
HOMES = {
    "functional": "functional",
    "nn": "nn",
    "calibration": "calibration",
    "export": "export",
    "summary": "tools",
    "plots": "tools",
    "size": "tools",
    "sensitivity": "tools",
    "budget": "tools",
    "evaluation": "tools",
    "streaming": "tools",
    "callbacks": "lightning",
    "distillation": "lightning",
    "examples": "examples",
    "__init__": "package",
}
LIGHTNING = {"lightning", "pytorch_lightning", "lightning_fabric"}
MAY_IMPORT_LIGHTNING = {"lightning", "examples", "package"}
# third-party packages functional/ may use besides torch: none (the standard library is always allowed)
FUNCTIONAL_THIRD_PARTY = {"torch"}


def layer_of(module: str) -> str:
    """The layer of a dotted module name inside the package (``lightning_compress.nn.select`` -> ``nn``)."""
    parts = module.split(".")
    return HOMES[parts[1] if len(parts) > 1 else "__init__"]


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import statement in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base == "lightning_compress":  # from lightning_compress import plots: the submodules themselves
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
    return found


def violations(path: Path) -> list[str]:
    """Every import of ``path`` that breaks a rule, as ``file:line: what``."""
    mine = layer_of(module_name(path))
    out = []
    for line, target in imports(path):
        where = f"{path.relative_to(PACKAGE.parent)}:{line}"
        top = target.split(".")[0]
        if top == "lightning_compress" and "." in target:
            theirs = layer_of(target)
            if LAYERS.index(theirs) > LAYERS.index(mine):
                out.append(f"{where}: {mine} imports {target} from the higher layer {theirs}")
        elif top in LIGHTNING and mine not in MAY_IMPORT_LIGHTNING:
            out.append(f"{where}: {mine} imports {target}; only {sorted(MAY_IMPORT_LIGHTNING)} may import Lightning")
        elif mine == "functional" and top not in FUNCTIONAL_THIRD_PARTY and top not in STDLIB and top != "__future__":
            out.append(f"{where}: functional imports {target}; allowed: torch and the standard library")
    return out


STDLIB = set(__import__("sys").stdlib_module_names)
SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    unknown = [str(p) for p in SOURCES if module_name(p).split(".")[1:2] and module_name(p).split(".")[1] not in HOMES]
    assert not unknown, f"modules outside every layer (add them to HOMES): {unknown}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    found = violations(path)
    assert not found, "\n".join(found)


def test_the_rules_catch_a_back_arrow(tmp_path, monkeypatch):
    """A planted import of each forbidden kind is reported (the check is not vacuous)."""
    planted = {
        "functional/planted.py": "from lightning_compress.nn.select import select_layers\n",
        "nn/planted.py": "import lightning.pytorch as pl\n",
        "export/planted.py": "def f():\n    from lightning_compress.callbacks.qat import QATFakeQuant\n",
        "calibration/planted.py": "from ..export import plan\n",
        "summary.py": "from lightning_compress import distillation\n",
        "functional/planted2.py": "import numpy\n",
    }
    root = tmp_path / "lightning_compress"
    monkeypatch.setitem(globals(), "PACKAGE", root)
    for rel, text in planted.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    found = {rel: violations(root / rel) for rel in planted}
    assert all(len(v) == 1 for v in found.values()), found
