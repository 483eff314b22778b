"""The package's shape: imports point one way (cli -> launch -> engine -> evaluation ->
data/models), no module imports itself back, and importing the config stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rp2k_dist"

#: Layers, lowest first: a module may import its own layer's package or a lower layer.
LAYERS: list[set[str]] = [
    {"errors"},
    {"input_spec", "storage"},
    {"models", "losses"},
    {"config"},  # validates model.name against the registry
    {"data", "run_folder"},
    {"evaluation"},
    {"engine"},
    {"launch", "analysis", "serving"},  # serving: `rp2k serve` (uses launch.submit)
    {"demo", "cli"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the rp2k_dist modules it imports anywhere (also inside functions)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import x`
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _unit(module: str) -> str:
    """``rp2k_dist.data.loader`` -> ``data``; ``rp2k_dist.config`` -> ``config``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "rp2k_dist"


def _layer(unit: str) -> int:
    for rank, layer in enumerate(LAYERS):
        if unit in layer:
            return rank
    raise AssertionError(f"rp2k_dist.{unit} is in no layer of tests/test_structure.py: place it")


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target] if target in path else [module, target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_imports_point_down_the_layers():
    wrong = sorted(f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
                   if _unit(a) != _unit(b) and _unit(a) != "rp2k_dist" and _unit(b) != "rp2k_dist"
                   and _layer(_unit(a)) < _layer(_unit(b)))
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_graph_sees_lazy_and_relative_imports():
    """The checks above can fail: the graph holds a function-level and a `from . import` edge."""
    graph = import_graph()
    assert "rp2k_dist.models.registry" in graph["rp2k_dist.config.sections"]  # inside ModelConfig.__post_init__
    assert "rp2k_dist.run_folder" in graph["rp2k_dist.engine.train"]  # `from .. import run_folder`
    assert "rp2k_dist.launch.trainer" in graph["rp2k_dist.cli.train"]


def test_importing_the_config_loads_neither_opencv_nor_torch():
    code = "import sys, rp2k_dist.config; print('cv2' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_pyproject_lists_every_package_and_ships_the_presets():
    import tomllib

    tool = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {_module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert set(tool["packages"]) == found | {"rp2k_dist.presets"}
    assert tool["package-dir"] == {"rp2k_dist.presets": "jobs"}
    assert not (PACKAGE / "presets").exists()  # jobs/ is the one copy


def test_the_documented_layout_names_every_module_once():
    """docs/contributing.md's "## Layout" tree lists each module of the package exactly once."""
    text = (PACKAGE.parent / "docs" / "contributing.md").read_text(encoding="utf-8")
    assert "\n## Layout\n" in text, "docs/contributing.md has no '## Layout' section"
    layout = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    lines = [line.split()[0] for line in layout.splitlines() if line.startswith("  ") and line.split()]
    modules = sorted(p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")
    assert sorted(name for name in lines if name.endswith(".py")) == modules
