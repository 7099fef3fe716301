"""The layering of docs/architecture.md: model → library → programs → command line, no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "segformer"
LAYERS = {
    "model": {"config", "modeling", "pretrained", "hub", "fileio", "labels", "allocator", "precision",
              "error_model"},
    "library": {"images", "processing", "inference", "metrics", "distributed", "visualize", "data", "evaluate",
                "predict", "convert", "export", "run_files", "corruptions", "robustness", "report",
                "backends", "integrations"},
    "programs": {"train", "train_log", "train_state", "recipe", "predict_folder", "serve"},
    "cli": {"cli", "commands", "__main__", "__init__"},
}  # fmt: skip
ORDER = list(LAYERS)


def layer_of(module: str) -> str:
    top = module.split(".")[0]
    return next(name for name, members in LAYERS.items() if top in members)


def imports() -> dict[str, set[str]]:
    """segformer-relative module name → the segformer modules it imports (at any depth, lazily or not)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__") or "__init__"
        package = rel.parts[:-1] if rel.name != "__init__" else rel.parts[:-1]
        found = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # a script entry point (`if __name__ == "__main__":`) may hand over to the command line
        tree.body = [n for n in tree.body if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(package[: len(package) - node.level + 1])
                target = ".".join(base + ([node.module] if node.module else []))
                found |= {target} if node.module else {".".join(base + [a.name]) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("segformer."):
                found.add(node.module.removeprefix("segformer."))
        graph[name] = {t for t in found if t and _is_module(t)}
    return graph


def _is_module(name: str) -> bool:
    path = PACKAGE.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_every_module_has_a_layer():
    for module in imports():
        assert layer_of(module) in ORDER, module


def test_no_module_imports_a_later_layer():
    for module, targets in imports().items():
        if module == "__init__":
            continue  # the package's public names
        for target in targets:
            assert ORDER.index(layer_of(target)) <= ORDER.index(layer_of(module)), f"{module} imports {target}"


def test_no_import_cycle_between_modules():
    graph = {m: {t.split(".")[0] if not t.startswith("data") else t for t in ts} for m, ts in imports().items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt == node or nxt not in graph:
                continue
            assert state.get(nxt) != 1, "import cycle: " + " → ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
