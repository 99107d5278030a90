"""The code of a step, computed from its imports: what decides whether a step's results are reused.

Two things reuse results when a step's code is unchanged, and both take it from here: dvc.yaml's
code deps of each stage (tests/test_step_code.py fails, naming the stage and the file, when they
differ from `step_code` of the stage's module) and train's resume fingerprint
(`code_hashes("components.train")`, kept in last.pt).

The rule; keep it true when you move an import, make one lazy or load a module by name:
- A step's code is its own module and every project module it imports, transitively: each
  `import` and `from ... import` in the source, at the top, inside functions or under `if`, read
  from the files with `ast` (not from what one run happened to load). Project modules are those
  of the packages in PACKAGES.
- A module that loads project modules by name (torchrun's `-m`, importlib) names them in a
  module-level tuple `LOADED_BY_NAME` beside that load; they count as its imports.
- A package's `__init__.py` counts when it holds code (one that is empty or only a docstring
  changes nothing).
- The command line (cnn_pipeline/, outside PACKAGES) is not a step's code: it validates the
  settings and calls the step its command names. dvc.yaml's `cnn-pipeline <step>` runs
  `components.<step>`.
- EXCLUDED modules are left out, and not followed: they cannot change what a step computes (the
  reason stands beside each; tests/test_step_code.py keeps the list honest).

    cnn-pipeline step-code     # each stage's code deps, as dvc.yaml lists them
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("components", "flows")
STEPS = ("prepare", "augment", "train", "evaluate", "register", "export")  # dvc.yaml's, in order
BY_NAME = "LOADED_BY_NAME"
TRACKING = "sends what a step computed to MLflow; no step output is computed from it"
EXCLUDED = {
    "components/core/atomic.py": "writes a file whole or not at all; what is written is the "
                                 "caller's",
    "components/core/secrets.py": "refuses settings that hold a secret: a run stops or goes on "
                                  "with the same values",
    "components/core/lifetime.py": "ends a process with the one that started it; it computes "
                                   "the same while it runs",
    **{f"components/tracking/{name}.py": TRACKING
       for name in ("__init__", "delivery", "lineage", "run", "store")},
}


def step_code(module: str) -> list[str]:
    """The project files (paths relative to the project, sorted) that make up `module`'s code."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _file(name)
        if path is None or path in seen or path in EXCLUDED:
            continue
        seen.add(path)
        todo += _package_inits(name)
        todo += _imports(path)
    return sorted(p for p in seen if _has_code(p))


def code_hashes(module: str) -> dict[str, str]:
    """sha256 of each file of `module`'s code, by path: what train's fingerprint compares."""
    return {path: hashlib.sha256((ROOT / path).read_bytes()).hexdigest()
            for path in step_code(module)}


def _file(module: str) -> str | None:
    """The project file of a dotted module name, or None outside the project."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path.relative_to(ROOT).as_posix()
    return None


def _package_inits(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@functools.cache
def _imports(path: str) -> list[str]:
    """Every module name `path` imports or names in LOADED_BY_NAME."""
    tree = ast.parse((ROOT / path).read_text(), filename=path)
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # `from pkg import mod` imports pkg.mod when it is a module; a name in pkg otherwise.
            base = _absolute(path, node.module, node.level)
            found.append(base)
            found += [f"{base}.{alias.name}" for alias in node.names]
    return found + loaded_by_name(tree)


def _absolute(path: str, module: str | None, level: int) -> str:
    """`from .mod import x` in `path`, as an absolute module name."""
    if not level:
        return module or ""
    package = Path(path).parent.parts[:len(Path(path).parent.parts) - level + 1]
    return ".".join([*package, *([module] if module else [])])


def loaded_by_name(tree: ast.Module) -> list[str]:
    """The strings of a module-level `LOADED_BY_NAME = (...)`, constants named in it resolved."""
    constants = {target.id: node.value.value for node in tree.body
                 if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                 for target in node.targets if isinstance(target, ast.Name)}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == BY_NAME for t in node.targets):
            if not isinstance(node.value, ast.Tuple | ast.List):
                raise ValueError(f"{BY_NAME} = {ast.unparse(node.value)}: write it as a tuple of "
                                 "strings or module-level string constants; it is read, not run")
            return [item.value if isinstance(item, ast.Constant) else constants[item.id]
                    for item in node.value.elts]
    return []


def _has_code(path: str) -> bool:
    if not path.endswith("__init__.py"):
        return True
    body = ast.parse((ROOT / path).read_text()).body
    return bool(body[1:] if body and ast.get_docstring(ast.Module(body, [])) else body)


def stage_code() -> dict[str, list[str]]:
    """Each stage's code deps, as dvc.yaml lists them (`cnn-pipeline step-code`)."""
    return {step: step_code(f"components.{step}") for step in STEPS}
