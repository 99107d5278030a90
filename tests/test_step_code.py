"""What a step's code is, computed from its imports (components/step_code.py), and what follows
from it: dvc.yaml's code deps equal it for every stage, train's resume fingerprint covers it, the
exclusions are honest, and no module that is not a step imports a step.
"""

from __future__ import annotations

import ast
import copy
import importlib
import shutil
from pathlib import Path

import pytest
import yaml

from components import step_code
from components.step_code import EXCLUDED, STEPS, code_hashes

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = sorted(p for p in (ROOT / "components").glob("*.py") if p.name != "__init__.py")


def code_deps_mismatches(dvc_yaml: dict) -> list[str]:
    """One line per stage whose code deps (deps ending in .py) differ from its module's code."""
    problems = []
    for stage, spec in dvc_yaml["stages"].items():
        module = spec["cmd"].split("-m", 1)[1].split()[0]
        listed = {d for d in spec.get("deps", []) if str(d).endswith(".py")}
        computed = set(step_code.step_code(module))
        for path in sorted(computed - listed):
            problems.append(f"stage {stage}: {path} is imported by {module} but not a dep")
        for path in sorted(listed - computed):
            problems.append(f"stage {stage}: {path} is a dep but not imported by {module}")
    return problems


def test_every_stage_depends_on_exactly_its_modules_code():
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert list(dvc_yaml["stages"]) == list(STEPS)
    problems = code_deps_mismatches(dvc_yaml)
    assert not problems, "dvc.yaml's code deps drifted (python -m components.step_code):\n" + \
        "\n".join(problems)


def test_the_check_fails_naming_the_stage_and_file_when_a_dep_is_missing_or_extra():
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    broken = copy.deepcopy(dvc_yaml)
    broken["stages"]["evaluate"]["deps"].remove("components/checkpoint.py")
    broken["stages"]["register"]["deps"].append("components/augment.py")
    assert code_deps_mismatches(broken) == [
        "stage evaluate: components/checkpoint.py is imported by components.evaluate but not a dep",
        "stage register: components/augment.py is a dep but not imported by components.register",
    ]


def test_function_level_imports_and_modules_loaded_by_name_count(tmp_path, monkeypatch):
    root = tmp_path / "project"
    (root / "components").mkdir(parents=True)
    (root / "components/__init__.py").write_text("")
    (root / "components/step.py").write_text(
        "from components import helper\n\ndef main():\n    import components.lazy\n")
    (root / "components/helper.py").write_text(
        'WORKER = "components.worker"\nLOADED_BY_NAME = (WORKER, "components.other")\n')
    for name in ("lazy", "worker", "other", "unused"):
        (root / f"components/{name}.py").write_text("")
    (root / "components/atomic.py").write_text("import components.unused\n")
    (root / "components/lazy.py").write_text("from . import atomic\n")
    monkeypatch.setattr(step_code, "ROOT", root)
    step_code._imports.cache_clear()
    try:
        # atomic.py is excluded: neither it nor what only it imports counts.
        assert step_code.step_code("components.step") == [
            "components/helper.py", "components/lazy.py", "components/other.py",
            "components/step.py", "components/worker.py"]
    finally:
        step_code._imports.cache_clear()


def test_the_fingerprint_hashes_exactly_trains_code():
    from components.train import _fingerprint

    manifest = {"hashes": {}, "classes": [{"name": "a", "index": 0}], "image_size": [8, 8],
                "channels": 1}
    from components.params import Params

    found = _fingerprint(Params(), manifest, {})
    assert found["code"] == code_hashes("components.train")
    assert set(found["code"]) == set(step_code.step_code("components.train"))
    assert {"components/recipe.py", "components/batches.py", "components/ddp.py"} <= set(
        found["code"])


def test_the_served_models_code_is_registers():
    """register logs components/served.py (which MLflow loads by its path) as the served model's
    code: its code is part of register's, so a change to serving registers a new model."""
    served = set(step_code.step_code("components.served"))
    assert {"components/served.py", "components/serve.py", "components/images.py"} <= served
    assert served <= set(step_code.step_code("components.register"))
    assert "components/onnx_model.py" in step_code.step_code("components.export")


@pytest.mark.parametrize("path", sorted(EXCLUDED))
def test_excluded_modules_compute_nothing_a_step_outputs(path):
    """An excluded module exists, some step imports it, and it imports nothing that computes:
    no step, no model or data code, no torch (only settings and the command line that reads them,
    file names and other excluded modules, and the prepared data's reader for a dataset record)."""
    assert (ROOT / path).is_file(), f"{path} is excluded but does not exist"
    allowed = {"components", "components.params", "components.cli", "components.files",
               "components.prepared",
               *(p.removesuffix(".py").replace("/", ".") for p in EXCLUDED)}
    imported = _project_imports(ROOT / path)
    assert imported <= allowed, f"{path} imports {sorted(imported - allowed)}"
    assert not {"torch", "numpy"} & _top_level_imports(ROOT / path)
    importers = [s for s in STEPS if path in _closure_with_exclusions(f"components.{s}")]
    assert importers, f"{path} is excluded, but no step imports it: drop it from EXCLUDED"


STEP_MODULES = {f"components.{s}" for s in (*STEPS, "predict")}


def test_no_module_that_is_not_a_step_imports_a_step():
    for path in COMPONENTS:
        if f"components.{path.stem}" in STEP_MODULES:
            continue
        bad = _steps_imported(path)
        assert not bad, f"{path.relative_to(ROOT)} (not a step) imports the step {sorted(bad)}"


def test_a_copy_with_a_module_outside_the_rule_is_seen(tmp_path):
    """The import-graph check can fail: an infrastructure module importing a step is caught."""
    copy_ = tmp_path / "tracking.py"
    shutil.copy(ROOT / "components/tracking.py", copy_)
    copy_.write_text(copy_.read_text() + "\n\ndef _x():\n    from components.augment import x\n")
    assert "components.augment" in _project_imports(copy_)
    assert _steps_imported(copy_) == {"components.augment"}


def _steps_imported(path: Path) -> set[str]:
    return _project_imports(path) & STEP_MODULES


def test_modules_loaded_by_name_are_read_as_their_module_defines_them():
    """step_code reads LOADED_BY_NAME without running the module: each one it reads equals the
    module's own value, and one it cannot read statically is refused, naming it."""
    found = 0
    for path in sorted([*ROOT.glob("components/*.py"), *ROOT.glob("flows/*.py")]):
        tree = ast.parse(path.read_text())
        if not any(isinstance(node, ast.Assign) and step_code.BY_NAME in
                   [t.id for t in node.targets if isinstance(t, ast.Name)] for node in tree.body):
            continue
        module = importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
        assert step_code.loaded_by_name(tree) == list(module.LOADED_BY_NAME), path
        found += 1
    assert found >= 3  # ddp, serve, kfp_tasks
    import flows.kfp_tasks

    assert tuple(f"components.{s}" for s in STEPS) == flows.kfp_tasks.LOADED_BY_NAME
    with pytest.raises(ValueError, match="LOADED_BY_NAME = tuple"):
        step_code.loaded_by_name(ast.parse("LOADED_BY_NAME = tuple(x for x in 'ab')"))


def _project_imports(path: Path) -> set[str]:
    return {n for n in _imports_of(path) if step_code._file(n) is not None}


def _imports_of(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return found


def _top_level_imports(path: Path) -> set[str]:
    return {n.split(".")[0] for n in _imports_of(path)}


def _closure_with_exclusions(module: str) -> set[str]:
    """step_code's closure, keeping the excluded files in (not followed) to see who imports them."""
    seen, todo = set(), [module]
    while todo:
        path = step_code._file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        if path not in EXCLUDED:
            todo += step_code._imports(path)
    return seen


def test_no_test_module_imports_another():
    """Tests share through conftest.py fixtures and helper modules, never through each other."""
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        imported = {n for n in _imports_of(path) if n.startswith("tests.test_")}
        assert not imported, f"{path.name} imports {sorted(imported)}"
