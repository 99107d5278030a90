"""Refusing a command that cannot run, before it imports torch, timm, mlflow or scikit-learn.

`python -m components.<step>` (and `python -m components.predict`, `python -m flows.pipeline`,
`python -m flows.sweep`) imports its package first, and the package calls `run()` before the module
itself, with its imports of torch, timm, mlflow and scikit-learn, loads (seconds). `run()` reads
`--params`/`--set` with the entry point's own parser (components/cli.py), validates the settings
with the one loader (`components.params.load_params`) and checks that the step's input data is
there, with the very functions the step calls, so a typo or a missing folder is refused with the
step's own message (`error: ...`, exit code 2) in a fraction of a second. Anything it does not
refuse, the entry point then reads and checks again as always: in-process callers (the flows'
tasks, tests) never pass through here.

Why here and not lazy imports in each step: a step's heavy imports are at the top of its module,
where any later import joins them; keeping all of them out of the way of a refusal would be a rule
every edit of five modules has to keep. Python runs a package's `__init__.py` before the module
`-m` names, while `sys.argv[0]` is still "-m" (documented for -m), and `sys.orig_argv` says which
module: one place, whatever the steps import. components/__init__.py and this module are left
out of a step's code (components/step_code.py's EXCLUDED): they refuse to start a step or let it
start, and a step that starts computes the same.

Reads the settings file and, per entry point (ENTRY_POINTS), `data.root` (prepare and the flows
that start with it, for an image folder) or the prepared data's manifest (augment, train,
evaluate, register, export). Writes nothing. flows/__init__.py imports the components package,
so the preflight runs once for a flow too.

`--help` of a step (components.cli.COMMANDS) is printed here too, by the parser the step's main()
builds, described by the step function's docstring read from its source (`step_doc`): a fraction
of a second where importing the step took seconds. Other entry points print their own.

For every entry point it also registers `cli.quick_exit` as the process's first exit handler, so
that it runs after all others: the process then ends without the interpreter's last garbage
collections.
"""

from __future__ import annotations

import ast
import atexit
import contextlib
import importlib.util
import io
import sys
from collections.abc import Callable
from pathlib import Path

from components import cli
from components.params import Params, UserError
from components.prepared import read_manifest


def data_root(root: str | Path) -> Path:
    """The image folder at `data.root`, or a UserError saying it is not there (prepare's check,
    through components.images.scan_folder)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"data.root = {str(root)!r}: folder not found; point data.root at a folder holding "
            "one folder per class (or train/ val/ test/ folders each holding class folders)"
        )
    return root


def _raw_data(params: Params) -> None:
    # The torchvision sources' files are known only to torchvision (seconds to import): prepare
    # checks those itself.
    if params.data.source == "imagefolder":
        data_root(params.data.root)


def _prepared_data(params: Params) -> None:
    read_manifest(params.paths.prepared)


# What each entry point needs before it starts, besides valid settings.
ENTRY_POINTS: dict[str, Callable[[Params], None]] = {
    "components.prepare": _raw_data,
    "components.augment": _prepared_data,
    "components.train": _prepared_data,
    "components.evaluate": _prepared_data,
    "components.register": _prepared_data,
    "components.export": _prepared_data,
    "components.predict": lambda params: None,
    "flows.pipeline": _raw_data,  # its first task is prepare
    "flows.sweep": _raw_data,  # the search prepares the data first
}


def step_doc(module: str) -> str | None:
    """The docstring of step `module`'s function of the same name (`components.train`: train),
    read from its source: what its `--help` describes, as `python -m` would show it once the
    module is imported, which takes seconds."""
    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text(), spec.origin)
    step = module.rsplit(".", 1)[-1]
    found = next(node for node in tree.body
                 if isinstance(node, ast.FunctionDef) and node.name == step)
    return ast.get_docstring(found, clean=False)


def main_module() -> str | None:
    """The module `python -m` is about to run, while its packages are imported; else None."""
    if sys.argv[:1] != ["-m"] or len(sys.orig_argv) < len(sys.argv):
        return None
    # sys.orig_argv ends with the module's name (or "-mNAME") and then the module's arguments.
    name = sys.orig_argv[-len(sys.argv)]
    return name.removeprefix("-m") if name.startswith("-m") else name


def run() -> None:
    """Refuse `python -m <entry point>` now when its settings or input data are wrong; end it,
    whatever its outcome, with `cli.quick_exit`."""
    name = main_module() or ""
    check = ENTRY_POINTS.get(name)
    if check is None:
        return
    atexit.register(cli.quick_exit)  # the first registered runs last
    try:  # the entry point's own parser reports a malformed command line, in its own words
        with contextlib.redirect_stderr(io.StringIO()):
            args, rest = cli.settings_parser().parse_known_args(sys.argv[1:])
    except SystemExit:
        return
    if {"-h", "--help"} & set(rest):
        if name in cli.COMMANDS:  # a step: its help without importing it
            cli.step_parser(name, step_doc(name)).parse_args(sys.argv[1:])
        return
    with cli.user_errors():
        check(cli.load(args))
