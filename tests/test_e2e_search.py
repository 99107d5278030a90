"""An Optuna search end to end on conftest's stack (a Prefect server, an MLflow server, process
workers, the project deployed), killed and started again: the sweep deployment with
search.method=optuna runs its trials as runs of training-pipeline/digits on a worker; the search's
flow run is SIGKILLed while a trial trains and the deployment is run again with the same settings.

One search serves both tests (each flow run costs a worker its pull steps and imports): the
search completes, prunes, nests every trial under its parent run and registers once; the resumed
search kept the trial that had finished, cancelled the killed search's running trial through
Prefect and ran new trials in its place.

What each trial draws is known: a seeded random sampler over choices (the draws are checked).
Seed 88 gives trial 0 (lr 0.0003, 2 epochs: finishes) and trial 1 (lr 0.003, 1000 epochs: still
training when the search is killed; ahead of trial 0 at both of trial 0's epochs, so the pruner
leaves it); the search started again draws from seed 88 + 2 (trials in the study) lr 1e-6 for the
trial that takes trial 1's place: the median pruner (one start-up trial, trial 0) stops it after
its first epoch, so pruning is certain.
"""

import contextlib
import json
import signal
import time

import optuna
import psutil
import pytest
from mlflow import MlflowClient

from components import files
from tests.projects import CLONE, Stack
from tests.servers import api_post

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # five flow runs, two in a row

MODEL = "search-classifier"
STORAGE = "outputs/search/" + files.STUDY_DB  # the default: paths.search in the workers' clone
PARAMS = {
    "search": {"method": "optuna", "trials": 2, "parallel": 2, "sampler": "random", "seed": 88,
               "pruner": "median", "startup_trials": 1,
               "space": {"train.lr": {"choice": [0.0003, 0.003, 1e-6]},
                         "train.epochs": {"choice": [2, 1000]}}},
    "evaluate": {"mistakes": 4}, "register": {"model_name": MODEL, "flush_timeout_s": 5},
}


def _study(stack: Stack):
    url = f"sqlite:///{stack.workers / CLONE / STORAGE}"
    names = [n for n in optuna.get_all_study_names(url) if n.startswith(f"{MODEL}-")]
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=url)


def _kill_flow_run(worker: psutil.Process, flow_run_id: str) -> int:
    """SIGKILL every process of one flow run among the worker's descendants."""
    killed = 0
    for proc in worker.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("PREFECT__FLOW_RUN_ID") == flow_run_id:
                proc.send_signal(signal.SIGKILL)
                killed += 1
    return killed


def _wait_for_trial_1_training(stack: Stack) -> list:
    deadline = time.monotonic() + 1200
    seen: object = "no study yet"
    while time.monotonic() < deadline:
        # Read only once the search made the file (reading would create it); it may be busy.
        try:
            assert (stack.workers / CLONE / STORAGE).is_file()
            trials = _study(stack).trials
        except Exception as e:  # not there yet, or busy: try again
            seen = repr(e)
        else:
            seen = [(t.number, t.state.name, dict(t.intermediate_values)) for t in trials]
            if len(trials) == 2 and trials[0].state.is_finished() and \
                    trials[1].intermediate_values:
                return trials
        time.sleep(0.5)
    limits = stack.prefect("concurrency-limit", "ls")
    raise AssertionError(f"trial 0 never finished while trial 1 trained; last seen: {seen}\n"
                         f"{limits}")


@pytest.fixture(scope="module")
def search(stack):
    """The search, killed while trial 1 trains and started again; what the study held then."""
    with stack.worker("o1", limit=3) as worker:  # the search and two trials at once
        first = stack.run_deployment("sweep/digits", PARAMS, watch=False)
        trials = _wait_for_trial_1_training(stack)
        before = {t.number: (t.state.name, t.value) for t in trials if t.state.is_finished()}
        assert _kill_flow_run(psutil.Process(worker.pid), first) >= 1
        second = stack.run_deployment("sweep/digits", PARAMS)  # same settings: same study
    study = _study(stack)
    return {"before": before, "second": second, "study": study,
            "trials": sorted(study.trials, key=lambda t: t.number)}


def test_search_on_workers_prunes_nests_every_trial_and_registers_once(stack, search):
    study, trials = search["study"], search["trials"]
    assert [(t.params["train.lr"], t.params["train.epochs"]) for t in trials] == [
        (0.0003, 2), (0.003, 1000), (1e-6, 2)]  # the seed's draws
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "PRUNED"]
    assert list(trials[2].intermediate_values) == [1]  # pruned after its first epoch
    folder = stack.workers / CLONE / "outputs/search" / study.study_name / "trial-2" / "train"
    assert len(json.loads((folder / files.HISTORY).read_text())) == 1
    assert (folder / files.MODEL).is_file()  # a pruned trial ends cleanly

    client = MlflowClient(stack.mlflow)
    experiment = client.get_experiment_by_name(MODEL)
    parents = client.search_runs([experiment.experiment_id],
                                 filter_string="tags.`mlflow.source.name` = 'flows.search'")
    assert len(parents) == 1  # the resumed search kept the study's parent run
    parent = parents[0].info.run_id
    runs = {t.number: client.get_run(t.user_attrs["mlflow_run"]) for t in trials}
    assert all(r.data.tags["mlflow.parentRunId"] == parent for r in runs.values())
    assert [runs[n].data.tags["search.state"] for n in range(3)] == [
        "COMPLETE", "FAIL", "PRUNED"]
    assert runs[0].data.params["trial.number"] == "0"
    assert runs[0].data.params["trial.train.lr"] == "0.0003"
    logged = {a.path for a in client.list_artifacts(parent, "search")}
    assert {f"search/{name}" for name in (files.HISTORY_PNG, files.IMPORTANCES_PNG,
                                          files.PARALLEL_PNG, files.TRIALS_CSV)} <= logged

    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert len(versions) == 1 and versions[0].run_id == runs[0].info.run_id  # the best: trial 0
    table = api_post(stack.env["PREFECT_API_URL"], "/artifacts/filter", {
        "artifacts": {"key": {"any_": ["search-trials"]}},
        "flow_runs": {"id": {"any_": [search["second"]]}}})
    assert len(table) == 1 and "PRUNED" in json.dumps(table[0]["data"])


def test_killed_search_started_again_continues_its_study(stack, search):
    trials = search["trials"]
    assert search["before"] == {0: ("COMPLETE", trials[0].value)}
    after = {t.number: (t.state.name, t.value) for t in trials}
    assert {n: after[n] for n in search["before"]} == search["before"]  # kept, not run again
    killed = trials[1]
    assert killed.state.name == "FAIL" and killed.user_attrs["cancelled"]
    flow_run = api_post(stack.env["PREFECT_API_URL"], "/flow_runs/filter", {
        "flow_runs": {"id": {"any_": [killed.user_attrs["run"]["flow_run"]]}}})[0]
    assert flow_run["state"]["type"] == "CANCELLED"  # through Prefect
    assert max(killed.intermediate_values) < 1000  # it did not train on
    client = MlflowClient(stack.mlflow)
    assert client.get_run(killed.user_attrs["mlflow_run"]).info.status == "KILLED"
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 2  # place taken
