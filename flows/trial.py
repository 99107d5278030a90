"""A trial of a search: one training run that reports to its Optuna study and stops when pruned.

What names the trial: a `TrialRef` {study, number, storage} that the search driver hands to the
run, as the training flow's parameter `trial` (a Prefect run on a worker) or as `--trial JSON`
here (a local process). `storage` is the study's database URL as the driver shows it, without a
password; a worker whose CNN_PIPELINE_SEARCH_STORAGE is that database uses its own (with the
password). The trial must exist in the study and be running, or the run stops before training.

The train step reports the trial's metric (search.metric, e.g. val_acc) after every epoch to the
study, through the study's storage (so from any process or host), and asks the pruner. A pruned
trial ends cleanly: train stops after that epoch (StopTraining) with its checkpoints, history and
model.pt written, the trial is PRUNED in the study, its MLflow run is tagged
`search.state=PRUNED` and evaluate does not run. A trial that finishes train and evaluate is
marked done (user attr `done`); the driver then completes it with its best epoch's value.

The trial's MLflow run is nested under the search's parent run (tag mlflow.parentRunId), named
`<study>/trial-<n>`, with the trial's number and sampled settings as params (`trial.number`,
`trial.<setting>`); the trial records the run's id (user attr `mlflow_run`).

    # started by `python -m flows.sweep`, one per trial:
    python -m flows.trial --trial '{"study": "s", "number": 0, "storage": "sqlite:////a/optuna.db"}'
        [--params params.yaml] [--set ...]
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from components import augment as augment_step
from components import cli, files
from components import evaluate as evaluate_step
from components import train as train_step
from components.credentials import secrets_in
from components.params import Params, UserError
from components.tracking import tracked, tracking_uri
from flows import run_tags, study

PRUNED = "PRUNED"


class TrialRef(BaseModel):
    """Which trial of which study a training run is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    study: str = Field(min_length=1, max_length=200)
    number: int = Field(ge=0)
    storage: str = Field(min_length=1)  # the database URL, without a password

    @field_validator("storage")
    @classmethod
    def _no_password(cls, url: str) -> str:
        if secrets_in(url):
            raise ValueError("carries a password: give it in CNN_PIPELINE_SEARCH_STORAGE on the "
                             "worker, and the URL without it here")
        return url


def parse_ref(text: str | dict | TrialRef) -> TrialRef:
    try:
        if isinstance(text, str):
            return TrialRef.model_validate_json(text)
        return TrialRef.model_validate(text)
    except ValidationError as err:
        raise UserError(f"trial {text}: {err.errors(include_url=False)[0]['msg']} (expected "
                        '{"study": NAME, "number": N, "storage": URL})') from None


class Reporter:
    """train's callback for a trial; see the module docstring."""

    def __init__(self, params: Params, ref: TrialRef):
        import optuna

        self.params, self.ref = params, ref
        self.handle = study.load_for_trial(ref.study, study.trial_storage_url(ref.storage))
        try:
            self.frozen = self.handle.trial(ref.number)
        except KeyError:
            raise UserError(f"study {ref.study} has no trial {ref.number}") from None
        if self.frozen.state != optuna.trial.TrialState.RUNNING:
            raise UserError(f"trial {ref.number} of study {ref.study} is "
                            f"{self.frozen.state.name}, not running: it is not trained again")
        recorded = self.handle.study.user_attrs["settings"]["search"]
        self.metric = recorded["metric"]
        self.trial = optuna.trial.Trial(self.handle.study, self.handle.trial_id(ref.number))
        self.pruned: str | None = None

    def on_train_start(self, resumed_from: int) -> None:
        """After the tracker opened the MLflow run (it comes first): nest it and name it."""
        run = _run_file(self.params)
        if run is None:
            return
        parent = self.handle.study.user_attrs.get("mlflow_parent_run")
        client = MlflowClient(tracking_uri())
        tags = {"mlflow.runName": f"{self.ref.study}/trial-{self.ref.number}",
                "search.study": self.ref.study, "search.trial": str(self.ref.number)}
        if parent:
            tags["mlflow.parentRunId"] = parent
        for key, value in tags.items():
            client.set_tag(run["run_id"], key, value)
        logged = client.get_run(run["run_id"]).data.params
        sampled = {"trial.number": self.ref.number,
                   **{f"trial.{k}": v for k, v in self.frozen.params.items()}}
        for key, value in sampled.items():
            if key not in logged:  # params cannot change; a resumed trial has them already
                client.log_param(run["run_id"], key, value)
        self.trial.set_user_attr("mlflow_run", run["run_id"])

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        value = metrics.get(self.metric)
        if value is None:
            raise UserError(f"search.metric {self.metric} is not measured: the data has no "
                            "validation split; set data.val_fraction above 0")
        self.trial.report(float(value), epoch)
        if self.trial.should_prune():
            pruner = self.handle.study.user_attrs["settings"]["search"]["pruner"]
            self.pruned = f"pruned by the {pruner} pruner after epoch {epoch}: {self.metric} " \
                          f"{value:.4f}"
            self.handle.study.tell(self.ref.number, state=study.trial_state(PRUNED),
                                   skip_if_finished=True)
            raise train_step.StopTraining(self.pruned)

    def done(self) -> None:
        """Train and evaluate finished: the driver may complete the trial."""
        self.trial.set_user_attr("done", True)


def mark_done(ref: TrialRef) -> None:
    """The trial's run trained and evaluated (its driver completes it; flows/search.py)."""
    handle = study.load_for_trial(ref.study, study.trial_storage_url(ref.storage))
    handle.set_trial_attr(ref.number, "done", True)


def _run_file(params: Params) -> dict | None:
    path = Path(params.paths.train) / files.RUN
    return json.loads(path.read_text()) if path.is_file() else None


def train_trial(params: Params, reporter: Reporter) -> train_step.TrainResult:
    """The train step, tracked as always (the tracker heard first), with the reporter."""
    result = tracked(functools.partial(train_step.train, callbacks=[reporter]), "start")(params)
    if result.stopped_by and reporter.pruned:
        run_tags.tag_run(params, {"search.state": PRUNED, "search.pruned": reporter.pruned})
    return result


def run_trial(params: Params, ref: TrialRef) -> dict[str, Any]:
    """The trial's steps in this process, without Prefect: augment, train, evaluate."""
    reporter = Reporter(params, ref)
    augment_step.augment(params)
    trained = train_trial(params, reporter)
    summary = {"study": ref.study, "trial": ref.number, "epochs": trained.epochs,
               "pruned": reporter.pruned, "metrics": None}
    if reporter.pruned:
        return summary
    evaluated = tracked(evaluate_step.evaluate)(params)
    reporter.done()
    return {**summary, "metrics": {k: v for k, v in asdict(evaluated).items()
                                   if isinstance(v, int | float)}}


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser("python -m flows.trial", __doc__)
    parser.add_argument("--trial", required=True, metavar="JSON",
                        help='{"study": NAME, "number": N, "storage": URL}')
    args = parser.parse_args(argv)
    with cli.user_errors():
        params = cli.load(args)
        summary = run_trial(params, parse_ref(args.trial))
    cli.show(summary)


if __name__ == "__main__":
    main()
