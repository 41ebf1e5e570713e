"""The package layout: a few commands on top, packages below them, and imports that only point down.

The layers are declared here, once (docs/architecture.md describes them): a module may import its own
layer and the layers below it, never one above. `visiontune.train` is imported by nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "visiontune"
# lowest first; a package's modules share its layer
LAYERS = (
    ("errors",),
    ("models", "sweeper"),
    ("data",),
    ("training",),
    ("deploy",),
    ("evaluation",),
    ("top",),  # the commands and the shared entry pieces: cli, config, build, ...
)
TOP_LIMIT = 12


def layer_of(module: str) -> int:
    """visiontune.training.module -> the index of the `training` layer."""
    parts = module.split(".")
    unit = parts[1] if len(parts) > 2 or (len(parts) == 2 and (SRC / parts[1]).is_dir()) else parts[-1]
    if unit == "errors":
        return 0
    for i, names in enumerate(LAYERS):
        if unit in names:
            return i
    return len(LAYERS) - 1  # a module at the top of the package


def modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


def imports(path: Path, name: str) -> set[str]:
    """Every visiontune module that `path` imports, at the top or inside a function."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("visiontune")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if module.startswith("visiontune"):
                found.add(module)
                found |= {f"{module}.{a.name}" for a in node.names}
    return found


def test_at_most_twelve_modules_on_top():
    top = sorted(p.stem for p in SRC.glob("*.py") if p.stem != "__init__")
    assert len(top) <= TOP_LIMIT, top


def test_every_package_has_a_layer():
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    declared = {name for names in LAYERS for name in names}
    assert packages <= declared, packages - declared


def test_imports_point_down():
    mods = modules()
    upward = []
    for name, path in mods.items():
        for target in imports(path, name):
            if target not in mods:  # a name imported from a module, not a module
                continue
            if target == "visiontune.train":
                upward.append(f"{name} imports visiontune.train")
            elif layer_of(target) > layer_of(name):
                upward.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target}")
    assert not upward, "\n".join(sorted(upward))


def test_the_layer_test_sees_an_upward_import(tmp_path):
    """The check itself: a data module that imports the training layer is caught."""
    fake = tmp_path / "visiontune" / "data"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "bad.py").write_text("from visiontune.training.module import ImageClassifier\n")
    targets = imports(fake / "bad.py", "visiontune.data.bad")
    assert "visiontune.training.module" in targets
    assert layer_of("visiontune.training.module") > layer_of("visiontune.data.bad")
