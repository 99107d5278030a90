"""The command line every entry point shares: `--params FILE` and `--set section.key=value`.

    python -m components.<step> [--params params.yaml] [--set train.epochs=5 ...]
    python -m components.predict --folder inbox [--params ...] [--set ...]
    python -m flows.pipeline [--params ...] [--set ...]

One parser (`settings_parser`, the parent of every entry point's own) and one reader of what it
parsed (`components.params.load_params`), so an override means the same and fails with the same
message everywhere. Values are YAML: `--set model.checkpoint=null` sets a key back to null, and
`--set search.space='{train.lr: {log_uniform: [0.001, 0.01]}}'` gives a whole mapping as one value
(its own keys may hold dots: only the part before `=` is split at dots). A whole section may be
given as one mapping, `--set train='{epochs: 3, lr: 0.01}'`: it replaces the file's section, and
the keys it leaves out take their defaults (the Kubeflow pipeline passes its section parameters
this way).

The tracked steps (train, evaluate, register) also take where their MLflow run comes from and
where leftovers go, for runners whose inputs are read-only (Kubeflow; components/tracking.py):
`--mlflow-run ID` (join that run), `--mlflow-run-out FILE` (write the run's id there),
`--pending-dir DIR` (the step's own output folder).

A UserError (bad settings, a missing folder, an unreachable server) ends the command with
`error: <message>` on stderr and exit code 2; `python -m` refuses bad settings and missing input
data before the entry point's module imports anything heavy (components/preflight.py).

A step's printed result ends with `seconds` and `cpu_seconds`: the wall and CPU time (all the
process's threads) of the step's own work, the step function itself. Starting the process,
imports, reading the settings and the tracker's set-up and final flush are overhead, outside it
(bench/bench_loop.py sets the two side by side). Run as a program (`python -m`), a step then
ends without the interpreter's last garbage collections (`quick_exit`, which the preflight
registers).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Literal

from components import files
from components.params import DEFAULT_PARAMS, Params, UserError, load_params


def settings_parser() -> argparse.ArgumentParser:
    """`--params` and `--set`, to be given as a parent to an entry point's own parser."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--params", default=DEFAULT_PARAMS,
                        help=f"settings file (default {DEFAULT_PARAMS})")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        metavar="SECTION.KEY=VALUE",
                        help="override one setting (a YAML value: null, a list or a mapping "
                             "too); repeatable; validated with the file")
    return parser


def parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """An entry point's parser: its description, and the shared settings arguments."""
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
    """A step's result object (and `extra` keys) as JSON on stdout (logs go to stderr)."""
    data = asdict(result) if is_dataclass(result) else result
    print(json.dumps({**data, **extra} if extra else data, indent=2, default=str))


@dataclass(frozen=True)
class Command:
    """A step's command line beyond `--params`/`--set`: how its MLflow run is attached (None:
    untracked; components.tracking.tracked) and its own options (flag -> argparse keywords; the
    value reaches the step as the keyword argument argparse names `dest`)."""

    track: Literal["start", "join"] | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


# Every step's command line, here and not in the step's module, so that `--help` is printed
# without importing the step and its libraries (components/preflight.py).
COMMANDS = {
    "components.prepare": Command(),
    "components.augment": Command(),
    "components.train": Command(track="start"),
    "components.evaluate": Command(track="join"),
    "components.register": Command(track="join"),
    "components.export": Command(track="join", options={"--model": dict(
        metavar="URI", help="the registered version to export: models:/NAME@ALIAS or "
                            "models:/NAME/VERSION (default models:/<register.model_name>@champion"
                            ", the one you would ship)")}),
}


def step_parser(module: str, description: str | None) -> argparse.ArgumentParser:
    """The command line of step `module` (`components.<step>`): COMMANDS says what it takes."""
    command = COMMANDS.get(module, Command())
    steps = parser(f"python -m {module}", description)
    for flag, keywords in command.options.items():
        steps.add_argument(flag, **keywords)
    if command.track is not None:
        _tracking_arguments(steps, command.track)
    return steps


def run_step(step: Callable[..., Any], argv: list[str] | None = None,
             tracked: bool = True) -> None:
    """The main() of every step: parse the command line (`step_parser`), validate the settings,
    attach the MLflow run as COMMANDS says (unless not `tracked`: a DDP worker, whose parent
    tracks), run, print the result and the seconds of the step's own work."""
    module = _module_name(step)
    command = COMMANDS.get(module, Command())
    args = step_parser(module, step.__doc__).parse_args(argv)
    own = {dest: getattr(args, dest) for dest in map(_dest, command.options)}
    spent: list[float] = []

    @functools.wraps(step)
    def timed(params: Params, **kwargs: Any) -> Any:
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return step(params, **own, **kwargs)
        finally:
            spent.extend([time.perf_counter() - start, time.process_time() - cpu])

    with user_errors():
        params = load(args)
        run = timed
        if tracked and command.track is not None:
            from components.tracking import tracked as attach  # MLflow only where tracked

            run = attach(timed, command.track, run_id=getattr(args, "mlflow_run", None),
                         run_id_out=args.mlflow_run_out, pending_dir=args.pending_dir)
        result = run(params)
    show(result, seconds=round(spent[0], 3), cpu_seconds=round(spent[1], 3))


def quick_exit() -> None:
    """The last exit handler of a `python -m` entry point (components/preflight.py registers it):
    the process then ends without the interpreter's last garbage collections, which walk every
    object of torch, mlflow and the rest for nothing once the result is out (about as long as
    importing torch: bench/RESULTS.md, "The inner loop"). Every other exit handler has run by
    then; flushing files and joining threads still happen. Only for a process about to end:
    frozen objects are never collected."""
    gc.freeze()


def _module_name(step: Callable[..., Any]) -> str:
    """The step's module as `python -m` names it (which runs it as `__main__`)."""
    if step.__module__ != "__main__":
        return step.__module__
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return spec.name if spec is not None else "__main__"


def _dest(flag: str) -> str:
    """The attribute argparse stores a long option in (its own rule)."""
    return flag.lstrip("-").replace("-", "_")


def _tracking_arguments(steps: argparse.ArgumentParser, track: Literal["start", "join"]) -> None:
    group = steps.add_argument_group("MLflow run, where a runner's inputs are read-only "
                                     "(Kubeflow)")
    if track == "join":
        group.add_argument("--mlflow-run", metavar="ID",
                           help=f"log into this run, not the one <paths.train>/{files.RUN} "
                                "names")
    group.add_argument("--mlflow-run-out", metavar="FILE", help="write the run's id to FILE")
    group.add_argument("--pending-dir", metavar="DIR",
                       help="park what MLflow has not received in DIR (the step's own output "
                            "folder), not in paths.train")
