"""What a step's code is, computed from its imports (components/core/step_code.py), and what follows
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

from cnn_pipeline.commands import COMMANDS
from components.core import step_code
from components.core.step_code import EXCLUDED, STEPS, code_hashes

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = sorted(p for p in (ROOT / "components").rglob("*.py") if p.name != "__init__.py")
# Below the steps: what they use, one folder per concern. None imports a step or the command line.
CONCERNS = ("core", "data", "training", "serving", "tracking", "report")


def stage_module(cmd: str) -> str:
    """The module a stage's command runs: `python -m cnn_pipeline <step>` runs COMMANDS[step]'s."""
    assert cmd.startswith("python -m cnn_pipeline "), cmd
    return COMMANDS[cmd.split()[3]].run.split(":")[0]


def code_deps_mismatches(dvc_yaml: dict) -> list[str]:
    """One line per stage whose code deps (deps ending in .py) differ from its module's code."""
    problems = []
    for stage, spec in dvc_yaml["stages"].items():
        module = stage_module(spec["cmd"])
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
    assert not problems, "dvc.yaml's code deps drifted (cnn-pipeline step-code):\n" + \
        "\n".join(problems)


def test_the_check_fails_naming_the_stage_and_file_when_a_dep_is_missing_or_extra():
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    broken = copy.deepcopy(dvc_yaml)
    broken["stages"]["evaluate"]["deps"].remove("components/training/checkpoint.py")
    broken["stages"]["register"]["deps"].append("components/augment.py")
    assert code_deps_mismatches(broken) == [
        "stage evaluate: components/training/checkpoint.py is imported by components.evaluate "
        "but not a dep",
        "stage register: components/augment.py is a dep but not imported by components.register",
    ]


def test_function_level_imports_and_modules_loaded_by_name_count(tmp_path, monkeypatch):
    root = tmp_path / "project"
    (root / "components/core").mkdir(parents=True)
    (root / "components/__init__.py").write_text("")
    (root / "components/step.py").write_text(
        "from components import helper\n\ndef main():\n    import components.lazy\n")
    (root / "components/helper.py").write_text(
        'WORKER = "components.worker"\nLOADED_BY_NAME = (WORKER, "components.other")\n')
    for name in ("lazy", "worker", "other", "unused"):
        (root / f"components/{name}.py").write_text("")
    (root / "components/core/atomic.py").write_text("import components.unused\n")
    (root / "components/lazy.py").write_text("from .core import atomic\n")
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
    from components.core.params import Params

    found = _fingerprint(Params(), manifest, {})
    assert found["code"] == code_hashes("components.train")
    assert set(found["code"]) == set(step_code.step_code("components.train"))
    assert {"components/training/setup.py", "components/training/batches.py",
            "components/training/ddp.py"} <= set(found["code"])


def test_the_served_models_code_is_registers():
    """register logs components/serving/model_code.py (which MLflow loads by its path) as the served
    model's
    code: its code is part of register's, so a change to serving registers a new model."""
    served = set(step_code.step_code("components.serving.model_code"))
    assert {"components/serving/model_code.py", "components/serving/pyfunc.py",
            "components/data/images.py"} <= served
    assert served <= set(step_code.step_code("components.register"))
    assert "components/serving/onnx_model.py" in step_code.step_code("components.export")


@pytest.mark.parametrize("path", sorted(EXCLUDED))
def test_excluded_modules_compute_nothing_a_step_outputs(path):
    """An excluded module exists, some step imports it, and it imports nothing that computes:
    no step, no model or data code, no torch (only settings and the command line that reads them,
    file names and other excluded modules, and the prepared data's reader for a dataset record)."""
    assert (ROOT / path).is_file(), f"{path} is excluded but does not exist"
    allowed = {"components", "components.core", "components.core.params", "components.tracking",
               "components.core.outputs", "components.data.dataset",
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
    shutil.copy(ROOT / "components/tracking/run.py", copy_)
    copy_.write_text(copy_.read_text() + "\n\ndef _x():\n    from components.augment import x\n")
    assert "components.augment" in _project_imports(copy_)
    assert _steps_imported(copy_) == {"components.augment"}


def _steps_imported(path: Path) -> set[str]:
    return _project_imports(path) & STEP_MODULES


def test_modules_loaded_by_name_are_read_as_their_module_defines_them():
    """step_code reads LOADED_BY_NAME without running the module: each one it reads equals the
    module's own value, and one it cannot read statically is refused, naming it."""
    found = 0
    for path in sorted([*ROOT.rglob("components/**/*.py"), *ROOT.rglob("flows/**/*.py")]):
        tree = ast.parse(path.read_text())
        if not any(isinstance(node, ast.Assign) and step_code.BY_NAME in
                   [t.id for t in node.targets if isinstance(t, ast.Name)] for node in tree.body):
            continue
        module = importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
        assert step_code.loaded_by_name(tree) == list(module.LOADED_BY_NAME), path
        found += 1
    assert found >= 3  # ddp, serve, kfp_tasks
    import flows.kubeflow.tasks

    assert tuple(f"components.{s}" for s in STEPS) == flows.kubeflow.tasks.LOADED_BY_NAME
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
    """Every project file `module` imports, the excluded ones and what they import included: the
    import graph, to see who imports an excluded file."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = step_code._file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        todo += step_code._imports(path) + step_code._package_inits(name)
    return seen


@pytest.mark.parametrize("concern", CONCERNS)
def test_no_module_of_a_concern_imports_a_step_or_the_command_line(concern):
    """data, training, serving, tracking, core and report code never import a step or the
    command line (cnn_pipeline/): only the command line and the flows do."""
    for path in sorted((ROOT / "components" / concern).glob("*.py")):
        imported = set(_imports_of(path))
        bad = {n for n in imported if n.split(".")[0] == "cnn_pipeline"} | _steps_imported(path)
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_import_rule_check_sees_a_module_that_breaks_it(tmp_path):
    """The check above can fail: a concern's module importing the command line is caught."""
    copy_ = tmp_path / "images.py"
    copy_.write_text((ROOT / "components/data/images.py").read_text()
                     + "\n\ndef _x():\n    from cnn_pipeline.cli import show\n")
    assert "cnn_pipeline.cli" in _imports_of(copy_)


def test_no_test_module_imports_another():
    """Tests share through conftest.py fixtures and helper modules, never through each other."""
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        imported = {n for n in _imports_of(path) if n.startswith("tests.test_")}
        assert not imported, f"{path.name} imports {sorted(imported)}"
