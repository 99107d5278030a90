"""cnn-pipeline: the one command line of the pipeline.

    cnn-pipeline prepare|augment|train|evaluate|register|export [--params F] [--set K=V ...]
    cnn-pipeline predict --folder DIR [--model URI_OR_PATH]   # score a folder of images
    cnn-pipeline serve [--model URI] [--port 5001]            # MLflow's model server
    cnn-pipeline search [--worker N]                          # an Optuna search, workers here
    cnn-pipeline pipeline [--skip-register]                   # the Prefect flow, in-process
    cnn-pipeline kfp compile --image REGISTRY/cnn-pipeline:TAG | kfp run-local
    cnn-pipeline check                                        # validate; print flow parameters
    cnn-pipeline step-code                                    # dvc.yaml's code deps
    python -m cnn_pipeline ...                                # the same, without the script

Every command takes `--params FILE` and `--set section.key=value` (repeatable): one parser
(`settings_parser`) and one reader (`components.core.params.load_params`), so an override means
the same and fails with the same message everywhere. Values are YAML: `--set
model.checkpoint=null` sets a key back to null, `--set search.space='{train.lr: {log_uniform:
[0.001, 0.01]}}'` gives a mapping as one value (only the part before `=` is split at dots), and
`--set train='{epochs: 3}'` replaces a whole section (keys it leaves out take their defaults: the
Kubeflow pipeline passes its sections this way).

Order: the command line is parsed and the settings validated, then what the command needs is
checked (cnn_pipeline/commands.py: the image folder, the prepared data, predict's folder), and
only then is the command's module imported, with torch, timm, mlflow or Prefect: a typo, a missing
folder or `--help` answers in a fraction of a second. A UserError ends the command with `error:
<message>` on stderr and exit code 2. A step's printed result (JSON on stdout; logs go to stderr)
ends with `seconds` and `cpu_seconds`: the wall and CPU time of the step function itself; the rest
of the process's time is overhead (bench/bench_loop.py). The tracked steps also take
`--mlflow-run ID`, `--mlflow-run-out FILE` and `--pending-dir DIR`, for runners whose inputs are
read-only (Kubeflow; components/tracking/run.py). The process ends without the interpreter's last
garbage collections (`quick_exit`).
"""

from __future__ import annotations

import argparse
import ast
import atexit
import contextlib
import functools
import gc
import importlib
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from cnn_pipeline.commands import COMMANDS, Command
from components.core import outputs
from components.core.params import DEFAULT_PARAMS, Params, UserError, load_params

PROG = "cnn-pipeline"


def settings_parser() -> argparse.ArgumentParser:
    """`--params` and `--set`, to be given as a parent to a command's own parser."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--params", default=DEFAULT_PARAMS,
                        help=f"settings file (default {DEFAULT_PARAMS})")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        metavar="SECTION.KEY=VALUE",
                        help="override one setting (a YAML value: null, a list or a mapping "
                             "too); repeatable; validated with the file")
    return parser


def parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """A parser of its own (an internal `python -m` entry point's): the settings arguments."""
    return argparse.ArgumentParser(prog=prog, description=description,
                                   parents=[settings_parser()],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def load(args: argparse.Namespace) -> Params:
    """The settings that `settings_parser`'s arguments name, validated."""
    return load_params(args.params, args.overrides)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A UserError inside becomes `error: ...` and exit code 2; anything else stays a traceback."""
    try:
        yield
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def show(result: Any, **extra: Any) -> None:
    """A result object (and `extra` keys) as JSON on stdout."""
    data = asdict(result) if is_dataclass(result) else result
    print(json.dumps({**data, **extra} if extra else data, indent=2, default=str))


def command_parser(commands: dict[str, Command] = COMMANDS,
                   described: bool = True) -> argparse.ArgumentParser:
    """`cnn-pipeline` and a subcommand per entry of `commands`, each (when `described`: for its
    --help) described by its function's docstring, read from the source without importing it."""
    top = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in commands.items():
        sub = subparsers.add_parser(name, help=command.about,
                                    description=_doc(command.run) if described else None,
                                    parents=[settings_parser()],
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        for flag, keywords in command.options.items():
            sub.add_argument(flag, **keywords)
        if command.track in ("start", "join"):
            _tracking_arguments(sub, command.track)
    return top


def main(argv: list[str] | None = None, commands: dict[str, Command] = COMMANDS) -> None:
    """The console script `cnn-pipeline` (and `python -m cnn_pipeline`); `commands`: its table
    (a test gives one of its own)."""
    atexit.register(quick_exit)  # the first registered runs last
    argv = sys.argv[1:] if argv is None else argv
    described = bool({"-h", "--help"} & set(argv))
    args = command_parser(commands, described).parse_args(argv)
    command = commands[args.command]
    with user_errors():
        params = load(args)
        command.needs(params, args)
        function = _function(command.run)
        if command.step:
            return run_step(function, command, args, params)
        own = _own_options(command, args)
        if command.settings == "file":
            result = function(args.params, args.overrides, **own)
        elif command.settings == "params":
            result = function(params, **own)
        else:
            result = function(**own)
    if result is not None:
        show(result)


def run_step(step: Callable[..., Any], command: Command, args: argparse.Namespace,
             params: Params) -> None:
    """A step: its MLflow run attached as the command says (not on a DDP worker: the process
    that launched it tracks), run, its result printed with the seconds of its own work."""
    tracked, step = _for_this_process(step, command)
    own = _own_options(command, args)
    spent: list[float] = []

    @functools.wraps(step)
    def timed(params: Params, **kwargs: Any) -> Any:
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return step(params, **own, **kwargs)
        finally:
            spent.extend([time.perf_counter() - start, time.process_time() - cpu])

    run = timed
    if tracked and command.track is not None:
        from components.tracking.run import tracked as attach  # MLflow only where tracked

        run = attach(timed, command.track, run_id=getattr(args, "mlflow_run", None),
                     run_id_out=getattr(args, "mlflow_run_out", None),
                     pending_dir=getattr(args, "pending_dir", None))
    show(run(params), seconds=round(spent[0], 3), cpu_seconds=round(spent[1], 3))


def quick_exit() -> None:
    """The last exit handler: the process then ends without the interpreter's last garbage
    collections, which walk every object of torch, mlflow and the rest for nothing once the
    result is out (about as long as importing torch). Every other exit handler has run by then;
    flushing files and joining threads still happen. Only for a process about to end: frozen
    objects are never collected."""
    gc.freeze()


def _for_this_process(step: Callable[..., Any], command: Command):
    """(whether to track, the step): train on a DDP rank (torchrun started this process for the
    step's parent) records its error for the parent, dies with torchrun, and does not track."""
    if command.track != "start":
        return True, step
    from components.training import ddp

    if not ddp.in_worker():
        return True, step
    ddp.worker_lifetime()
    return False, ddp.record(step)


def _function(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _doc(target: str) -> str | None:
    """The docstring of "module:function", read from its source without importing the module."""
    module, _, name = target.partition(":")
    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text(), spec.origin)
    found = next(node for node in tree.body
                 if isinstance(node, ast.FunctionDef) and node.name == name)
    return ast.get_docstring(found, clean=False)


def _own_options(command: Command, args: argparse.Namespace) -> dict[str, Any]:
    """A command's own options by the name argparse stores them under (the function's keyword)."""
    dests = [keywords.get("dest", flag.lstrip("-").replace("-", "_"))
             for flag, keywords in command.options.items()]
    return {dest: getattr(args, dest) for dest in dests}


def _tracking_arguments(steps: argparse.ArgumentParser, track: str) -> None:
    group = steps.add_argument_group("MLflow run, where a runner's inputs are read-only "
                                     "(Kubeflow)")
    if track == "join":
        group.add_argument("--mlflow-run", metavar="ID",
                           help=f"log into this run, not the one <paths.train>/{outputs.RUN} "
                                "names")
    group.add_argument("--mlflow-run-out", metavar="FILE", help="write the run's id to FILE")
    group.add_argument("--pending-dir", metavar="DIR",
                       help="park what MLflow has not received in DIR (the step's own output "
                            "folder), not in paths.train")
