"""Every output file name is defined once (components/core/outputs.py): no other module of
components/, flows/ or tests/ spells one, and dvc.yaml's outputs are those names in the folders of
params.yaml.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from components.core import outputs
from components.core.params import Paths

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("components", "flows", "tests")
NAMES = set(outputs.names().values())
FILE_NAMES = {n for n in NAMES if "." in n.strip(".")}  # folders' names are common words
TOKEN = re.compile(r"[A-Za-z0-9_.\-]+")


def spelled(path: Path, names: set[str] = FILE_NAMES) -> list[str]:
    """`line: name` for each string literal in `path` (docstrings aside) holding a file name as
    a whole word of a path or message."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef |
                                ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docstrings):
            found += [f"{node.lineno}: {t}" for t in TOKEN.findall(node.value) if t in names]
    return found


def test_no_module_but_files_spells_an_output_file_name():
    problems = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path in (ROOT / "components/core/outputs.py", Path(__file__)):
                continue
            problems += [f"{path.relative_to(ROOT)}:{hit}" for hit in spelled(path)]
    assert not problems, ("use components.core.outputs instead of these literals:\n"
                          + "\n".join(problems))


def test_the_scan_sees_a_spelled_name(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""Writes metrics.json."""\n\nPATH = "outputs/evaluate/metrics.json"\n'
                      'MSG = f"no {PATH}: run evaluate"\n')
    assert spelled(module) == ["3: metrics.json"]


def test_dvc_outputs_are_the_named_files_in_their_steps_folders():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    folders = {f"${{paths.{name}}}" for name in Paths.model_fields}
    for stage, spec in stages.items():
        declared = [*spec.get("outs", []), *spec.get("metrics", []), *spec.get("plots", [])]
        for out in declared:
            path = next(iter(out)) if isinstance(out, dict) else out
            folder, _, rest = path.partition("/")
            assert folder in folders, f"stage {stage}: {path} is not under a params.yaml path"
            if rest:
                assert all(part.removesuffix(outputs.HASH_SUFFIX) in NAMES
                           for part in rest.split("/")), (
                    f"stage {stage}: {path} names a file components/core/outputs.py does not")
            if stage != "prepare":
                assert folder == f"${{paths.{stage}}}", f"stage {stage} writes {path}"
