"""A static map of the project's imports, read with `ast`: every `import` and `from ... import`
statement of every module (module level and inside functions alike), resolved to project
modules. Used by tests/test_architecture.py for the layering rules and the DVC stage dependencies."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("components", "serving", "flows")


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@dataclass
class Edge:
    target: str
    line: int
    module_level: bool  # False: inside a function or method


@dataclass
class ImportMap:
    files: dict[str, Path] = field(default_factory=dict)  # module -> file
    edges: dict[str, list[Edge]] = field(default_factory=dict)  # module -> its imports of project modules

    def packages_of(self, module: str) -> list[str]:
        """The packages Python executes before `module` (their __init__ files)."""
        parts = module.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in self.files]

    def closure(self, start: str, module_level_only: bool = False) -> set[str]:
        """Every project module that importing `start` and calling into it may execute."""
        seen: set[str] = set()
        todo = [start]
        while todo:
            mod = todo.pop()
            if mod in seen:
                continue
            seen.add(mod)
            todo.extend(self.packages_of(mod))
            for edge in self.edges.get(mod, []):
                if edge.module_level or not module_level_only:
                    todo.append(edge.target)
        return seen


def _resolve(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The project modules one import statement names."""
    targets: list[str] = []
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative import
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            targets.append(sub if sub in known else base)
    return [t for t in targets if t.split(".")[0] in PACKAGES]


def build(root: Path = REPO) -> ImportMap:
    imports = ImportMap()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            imports.files[module_name(path, root)] = path
    known = set(imports.files)
    for module, path in imports.files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        top_level = {id(n) for n in tree.body}
        # statements directly in the module body, or in its top-level if/try blocks
        for n in tree.body:
            if isinstance(n, (ast.If, ast.Try)):
                top_level |= {id(c) for c in ast.walk(n) if isinstance(c, (ast.Import, ast.ImportFrom))}
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(node, module, path.name == "__init__.py", known):
                    if target != module:
                        edges.append(Edge(target, node.lineno, id(node) in top_level))
        imports.edges[module] = edges
    return imports


def find_cycle(imports: ImportMap) -> list[str] | None:
    """One import cycle (module-level and function-level imports alike), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    state = dict.fromkeys(imports.files, WHITE)
    stack: list[str] = []

    def visit(mod: str) -> list[str] | None:
        state[mod] = GREY
        stack.append(mod)
        for edge in imports.edges.get(mod, []):
            if edge.target not in state:
                continue
            if state[edge.target] == GREY:
                return stack[stack.index(edge.target):] + [edge.target]
            if state[edge.target] == WHITE:
                found = visit(edge.target)
                if found:
                    return found
        stack.pop()
        state[mod] = BLACK
        return None

    for mod in sorted(imports.files):
        if state[mod] == WHITE:
            found = visit(mod)
            if found:
                return found
    return None
