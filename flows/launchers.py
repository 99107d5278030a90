"""How a search's trials run: as runs of the training deployment through a Prefect pool, or as
processes on this machine. flows/search.py drives either through the same few calls.

- `PrefectLauncher` (the sweep flow with search.method=optuna): a trial is a run of the training
  deployment (`run_deployment`, not waited for) with the trial's settings as `overrides`,
  `skip_register`, `mlflow_parent_run` and `trial` (flows/trial.py); the pool's workers share the
  trials out. A run is cancelled through Prefect (Cancelling: its worker stops it).
- `ProcessLauncher` (`python -m flows.sweep`): a trial is `python -m flows.trial` in a process of
  its own (train seeds process-wide random state), in its own process group so that it can be
  cancelled whole; its output goes to `<trial folder>/trial.log`. Each gets a share of the CPU
  threads (OMP_NUM_THREADS, unless set) so that `parallel` trials do not fight over cores.

A run is recorded in its trial (user attr `run`) as a small dict, `kind` prefect or process, so a
search started again can tell whether the runs of a killed one are still going, whichever
launcher it uses itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from components import files
from components.atomic import write_json
from components.params import Params, load_params
from flows.study import same_start

STOP_WAIT_S = 20.0  # for a cancelled trial process to end after SIGTERM, before SIGKILL


class Launcher:
    """What the search needs from a way of running trials; the run bookkeeping is shared."""

    flow_run: str | None = None  # the search's own Prefect flow run, named in the study's lease

    def __init__(self) -> None:
        self.procs: dict[int, subprocess.Popen] = {}  # the processes this launcher started

    # Implemented by each launcher.
    def settings(self, extra: list[str]) -> Params:
        """The settings of a trial with `extra` overrides, validated like a user's run."""
        raise NotImplementedError

    def prepare(self, params: Params) -> None:
        """The prepared data every trial reads, made once (or found) before any trial."""
        raise NotImplementedError

    def start(self, number: int, extra: list[str], ref: dict[str, Any], parent: str | None
              ) -> dict[str, Any]:
        raise NotImplementedError

    def register(self, params: Params, extra: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    def tags(self) -> dict[str, str]:
        """Tags for the search's MLflow parent run."""
        return {}

    def publish(self, study: str, rows: list[dict], best, decision: dict | None) -> None:
        """Show the trials table where this launcher's user looks."""

    # Either kind of run, whoever started it.
    def ended(self, run: dict[str, Any]) -> str | None:
        """None while the run goes on; else how it ended, in words."""
        if run["kind"] == "prefect":
            return _flow_run_ended(run["flow_run"])
        return self._process_ended(run)

    def cancel(self, run: dict[str, Any]) -> None:
        if run["kind"] == "prefect":
            _cancel_flow_run(run["flow_run"])
        else:
            self._stop_process(run)

    def describe(self, run: dict[str, Any]) -> str:
        if run["kind"] == "prefect":
            return f"flow run {run['flow_run']}"
        return f"pid {run['pid']}, log {run['log']}"

    def _process_ended(self, run: dict[str, Any]) -> str | None:
        proc = self.procs.get(run["pid"]) if run.get("host") == socket.gethostname() else None
        if proc is not None:
            code = proc.poll()
            return None if code is None else f"exit code {code} (log {run['log']})"
        if _same_process(run):
            return None
        return f"ended (its search was not there to see how; log {run['log']})"

    def _stop_process(self, run: dict[str, Any]) -> None:
        if not _same_process(run):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run["pid"], signal.SIGTERM)
        proc = self.procs.get(run["pid"])
        try:
            if proc is not None:
                proc.wait(STOP_WAIT_S)
            else:
                import psutil

                psutil.Process(run["pid"]).wait(STOP_WAIT_S)
        except Exception:  # still there: no more asking
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(run["pid"], signal.SIGKILL)


def _same_process(run: dict[str, Any]) -> bool:
    """Whether the process of `run` is alive on this host (the same process, not a reused pid)."""
    import psutil

    if run.get("host") != socket.gethostname():
        return False
    try:
        proc = psutil.Process(run["pid"])
        return same_start(proc.create_time(), run["started"]) and \
            proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _flow_run_ended(flow_run: str) -> str | None:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run).state
    if state is None or not state.is_final():
        return None
    return f"flow run {flow_run} {state.name}" + (f": {state.message}" if state.message else "")


def _cancel_flow_run(flow_run: str) -> None:
    """Through Prefect: a run not started yet is cancelled at once, a running one is set
    Cancelling, which its worker acts on by stopping it."""
    from prefect import get_client
    from prefect.states import Cancelled, Cancelling

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run).state
        if state is None or state.is_final():
            return
        message = "cancelled by its search: the search that started it was stopped"
        new = Cancelling(message=message) if state.is_running() else Cancelled(message=message)
        client.set_flow_run_state(flow_run, new, force=True)


class PrefectLauncher(Launcher):
    """Trials as runs of the training deployment `deployment`, with the deployment's own
    parameters under `base` (the sweep's settings on top)."""

    def __init__(self, deployment: str, base: dict[str, Any], flow_run: str, name: str):
        super().__init__()
        self.deployment, self.base, self.flow_run, self.name = deployment, base, flow_run, name

    def _parameters(self, extra: list[str]) -> dict[str, Any]:
        return {**self.base, "overrides": [*self.base.get("overrides", []), *extra]}

    def settings(self, extra: list[str]) -> Params:
        from flows.settings import from_parameters

        return from_parameters(self._parameters(extra))

    def prepare(self, params: Params) -> None:
        from flows.pipeline import prepared_data

        prepared_data(params)  # the trials on this host find it cached

    def start(self, number, extra, ref, parent):
        from prefect.deployments import run_deployment

        parameters = {**self._parameters(extra), "skip_register": True,
                      "mlflow_parent_run": parent, "trial": ref}
        child = run_deployment(self.deployment, parameters=parameters, timeout=0,
                               flow_run_name=f"{ref['study']}/trial-{number}", tags=["search"])
        return {"kind": "prefect", "flow_run": str(child.id)}

    def register(self, params: Params, extra: list[str]) -> dict[str, Any]:
        """In place when the best trial's files are on this host; otherwise as one more run of
        the deployment with its settings (train resumes or, elsewhere, repeats exactly)."""
        from flows.pipeline import register_best

        return register_best(params, self.deployment, self._parameters(extra),
                             f"{self.name}/register-best", ["search"])

    def tags(self) -> dict[str, str]:
        from flows.run_tags import flow_run_tags

        return flow_run_tags()

    def publish(self, study, rows, best, decision) -> None:
        from prefect.artifacts import create_table_artifact

        version = (decision or {}).get("version")
        create_table_artifact(
            key="search-trials", table=rows,
            description=f"Study {study}: best trial {best.number} ({best.value:.4f})"
                        + (f", registered as version {version}" if version else ""))


class ProcessLauncher(Launcher):
    """Trials as local processes; `params_file` and `overrides` as on the command line."""

    def __init__(self, params_file: str | Path, overrides: list[str], parallel: int):
        super().__init__()
        self.params_file, self.overrides = str(params_file), list(overrides)
        self.threads = str(max(1, (os.cpu_count() or 1) // parallel))

    def settings(self, extra: list[str]) -> Params:
        return load_params(self.params_file, [*self.overrides, *extra])

    def prepare(self, params: Params) -> None:
        """Prepare unless the folder holds what these data settings make (flows.prepare_cache's
        key, recorded beside the study)."""
        from components.prepare import prepare
        from components.prepared import read_manifest
        from flows import prepare_cache

        key_file = Path(params.paths.search) / files.PREPARED_KEY
        recorded = json.loads(key_file.read_text()) if key_file.is_file() else {}
        key = prepare_cache.cache_key(params)
        if recorded.get("key") == key and prepare_cache.still_valid(recorded, params):
            return
        prepare(params)
        hashes = read_manifest(params.paths.prepared)["hashes"]
        write_json(key_file, {"key": key, "hashes": hashes})

    def start(self, number, extra, ref, parent):
        import psutil

        log = Path(self.settings(extra).paths.train).parent / files.TRIAL_LOG
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "flows.trial", "--trial", json.dumps(ref),
               "--params", self.params_file,
               *(f"--set={o}" for o in [*self.overrides, *extra])]
        env = {"OMP_NUM_THREADS": self.threads, **os.environ}
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        self.procs[proc.pid] = proc
        return {"kind": "process", "pid": proc.pid, "host": socket.gethostname(),
                "started": psutil.Process(proc.pid).create_time(), "log": str(log)}

    def register(self, params: Params, extra: list[str]) -> dict[str, Any]:
        from components.export import export
        from components.register import register
        from components.tracking import tracked

        decision = asdict(tracked(register)(params))
        tracked(export)(params)  # as the training pipeline does after register
        return decision
