"""A search end to end on conftest's stack (a Prefect server, an MLflow server, a process worker,
the project deployed): `prefect deployment run 'sweep/digits'` starts two runs of
search-worker/digits on the pool, which optimize one study; the search registers its best.

The space is a 2 x 2 grid with hopeless points (lr 1e-7): grid seed 4 gives trials 0 and 1 the
good learning rate, so the hopeless ones start after a good trial completed and the median pruner
(one start-up trial) stops them after their first epoch: pruning is certain.
"""

import json

import optuna
import pytest
from mlflow import MlflowClient

from components.core import outputs
from tests.support.projects import CLONE, Stack
from tests.support.servers import api_post

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

MODEL = "search-classifier"
STORAGE = "outputs/search/" + outputs.STUDY_DB  # the default: paths.search in the workers' clone
PARAMS = {
    "search": {"parallel": 2, "sampler": "grid", "seed": 4, "pruner": "median",
               "startup_trials": 1, "min_epochs": 1,
               "space": {"train.lr": {"choice": [0.003, 1e-7]},
                         "train.weight_decay": {"choice": [0.05, 0.01]}}},
    "train": {"epochs": 2}, "evaluate": {"mistakes": 0},
    "augment": {"preview_images": 2, "preview_views": 2},
    "register": {"model_name": MODEL, "flush_timeout_s": 5},
}


def _api(stack: Stack, path: str, body: dict) -> list:
    return api_post(stack.env["PREFECT_API_URL"], path, body)


@pytest.fixture(scope="module")
def search(stack):
    """The search, run as a deployment; its study and its worker flow runs."""
    with stack.worker("search", limit=3):  # the search's run and its two workers
        sweep = stack.run_deployment("sweep/digits", PARAMS)
    name = _api(stack, "/flow_runs/filter", {"flow_runs": {"id": {"any_": [sweep]}}})[0]["name"]
    workers = [r for r in _api(stack, "/flow_runs/filter", {"flow_runs": {
        "tags": {"all_": ["search"]}}}) if r["name"].startswith(f"{name}/worker-")]
    url = f"sqlite:///{stack.workers / CLONE / STORAGE}"
    study, = [n for n in optuna.get_all_study_names(url) if n.startswith(f"{MODEL}-")]
    return {"sweep": sweep, "workers": workers,
            "study": optuna.load_study(study_name=study, storage=url)}


def test_the_search_runs_its_workers_on_the_pool_each_trial_shown_inside_its_worker(
        stack, search):
    workers, trials = search["workers"], search["study"].trials
    assert sorted(w["name"].rsplit("-", 1)[1] for w in workers) == ["0", "1"]
    assert all(w["state"]["type"] == "COMPLETED" for w in workers)
    shown = {t["name"].split()[0] for t in _api(stack, "/task_runs/filter", {
        "flow_runs": {"id": {"any_": [w["id"] for w in workers]}}, "limit": 200})
        if t["name"].startswith("trial-")}
    trained = {f"trial-{t.number}" for t in trials if not t.user_attrs.get("skipped")}
    assert shown == trained  # a task run per trial, named with its number (and settings)
    table = _api(stack, "/artifacts/filter", {"artifacts": {"key": {"any_": ["search-trials"]}},
                                              "flow_runs": {"id": {"any_": [search["sweep"]]}}})
    assert len(table) == 1 and "PRUNED" in json.dumps(table[0]["data"])


def test_the_grid_is_searched_once_pruned_nested_and_its_best_registered_once(stack, search):
    study = search["study"]
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert sorted((t.params["train.lr"], t.params["train.weight_decay"]) for t in done) == [
        (1e-7, 0.01), (1e-7, 0.05), (0.003, 0.01), (0.003, 0.05)]  # each point once
    assert any(t.state.name == "PRUNED" for t in done)
    assert all(t.user_attrs.get("skipped") for t in study.trials if t.state.name == "FAIL")

    client = MlflowClient(stack.mlflow)
    experiment = client.get_experiment_by_name(MODEL)
    parent, = client.search_runs([experiment.experiment_id],
                                 filter_string="tags.`mlflow.source.name` = 'flows.search.workers'")
    runs = {t.number: client.get_run(t.user_attrs["mlflow_run"]) for t in done}
    for number, run in runs.items():
        trial = study.trials[number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["search.state"] == trial.state.name
        assert run.data.params["trial.number"] == str(number)
        assert float(run.data.params["trial.train.lr"]) == trial.params["train.lr"]
    best = study.best_trial
    assert runs[best.number].data.metrics["val_acc"] == best.value  # the value MLflow shows
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    assert {f"search/{name}" for name in (outputs.HISTORY_PNG, outputs.PARALLEL_PNG,
                                          outputs.TRIALS_CSV)} <= logged
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert [v.run_id for v in versions] == [runs[best.number].info.run_id]
