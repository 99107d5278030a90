"""A trial's training in a process of its own (train seeds process-wide state): augment, train,
evaluate, with the trial's settings; it dies with the search worker that started it.

Each epoch's search metric goes to the trial (through the study's storage) and the pruner may end
training after that epoch (StopTraining; evaluate does not run). Otherwise the trial's value is
the metric of the epoch whose weights model.pt holds (evaluate and register use them), logged
again to the MLflow run after the last epoch, so the run's `val_acc` is the trial's value. The
run is nested under the search's, named `<study>/trial-<n>`, with params `trial.number` and
`trial.<setting>`; the trial records its id (user attr `mlflow_run`). Prints {value, pruned}.

    python -m flows.search.trial --study NAME --number N [--params params.yaml] [--set ...]
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import optuna
from mlflow import MlflowClient
from mlflow.entities import Param, RunTag

from cnn_pipeline import cli
from components import augment, evaluate, train
from components.core import outputs
from components.core.lifetime import die_with_parent
from components.core.params import Params, UserError
from components.tracking.run import tracked
from components.tracking.store import tracking_uri
from flows import run_tags
from flows.search import study as studies
from flows.search.workers import WORKER_ENV


class Reporter:
    """train's callback for a trial; see the module docstring."""

    def __init__(self, params: Params, study_name: str, number: int):
        storage = studies.open_storage(studies.storage_url(params))
        study = optuna.load_study(study_name=study_name, storage=storage)  # the worker made it
        study.pruner = studies.make_pruner(study.user_attrs["settings"])
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(study_name), number)
        self.params, self.study, self.number = params, study, number
        self.trial = optuna.trial.Trial(study, trial_id)
        self.metric = study.user_attrs["settings"]["search"]["metric"]
        self.pruned: str | None = None

    def on_train_start(self, resumed_from: int) -> None:
        """After the tracker opened the MLflow run (it comes first): nest, name, label it."""
        run = json.loads((Path(self.params.paths.train) / outputs.RUN).read_text())["run_id"]
        client, name = MlflowClient(tracking_uri()), self.study.study_name
        tags = {"mlflow.runName": f"{name}/trial-{self.number}", "search.study": name,
                "mlflow.parentRunId": self.study.user_attrs.get("mlflow_parent_run")}
        logged = client.get_run(run).data.params  # a resumed run has its params already
        values = {"trial.number": self.number,
                  **{f"trial.{k}": v for k, v in self.trial.params.items()}}
        client.log_batch(run, tags=[RunTag(k, str(v)) for k, v in tags.items() if v],
                         params=[Param(k, str(v)) for k, v in values.items() if k not in logged])
        self.trial.set_user_attr("mlflow_run", run)

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        value = metrics.get(self.metric)
        if value is None:
            raise UserError(f"search.metric {self.metric} is not measured: the data has no "
                            "validation split; set data.val_fraction above 0")
        self.trial.report(float(value), epoch)
        if self.trial.should_prune():
            pruner = self.study.user_attrs["settings"]["search"]["pruner"]
            self.pruned = (f"pruned by the {pruner} pruner after epoch {epoch}: {self.metric} "
                           f"{value:.4f}")
            raise train.StopTraining(self.pruned)


def run_trial(params: Params, study_name: str, number: int) -> dict[str, Any]:
    """The trial's steps in this process (module docstring)."""
    reporter = Reporter(params, study_name, number)
    augment.augment(params)
    trained = tracked(functools.partial(train.train, callbacks=[reporter]), "start")(params)
    if reporter.pruned:
        run_tags.tag_run(params, {"search.pruned": reporter.pruned})
        return {"value": None, "pruned": reporter.pruned}
    history = json.loads(Path(trained.history_path).read_text())
    value = next(row for row in history if row["epoch"] == trained.best_epoch)[reporter.metric]

    def evaluate_and_log(params: Params, tracker) -> None:
        evaluate.evaluate(params, tracker=tracker)
        tracker.log_metrics({reporter.metric: value}, step=trained.epochs)  # now the latest

    tracked(evaluate_and_log)(params)
    return {"value": value, "pruned": None}


def main(argv: list[str] | None = None) -> None:
    die_with_parent(WORKER_ENV)
    parser = cli.parser("python -m flows.search.trial", __doc__)
    parser.add_argument("--study", required=True, help="the study's name")
    parser.add_argument("--number", required=True, type=int, help="the trial's number")
    args = parser.parse_args(argv)
    with cli.user_errors():
        result = run_trial(cli.load(args), args.study, args.number)
    cli.show(result)


if __name__ == "__main__":
    main()
