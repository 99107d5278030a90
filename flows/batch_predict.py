"""batch-predict: score a folder of images with a registered model (default: the champion).

Wraps `components.predict.predict` as a task, tracked in an MLflow run of its own per batch
(components.tracking, `batch`); loading `models:/...` talks to MLflow, so it is retried with
backoff. Leaves a markdown artifact `batch-predictions`: counts, the classes predicted, the drift
figures against their thresholds (drift.json, components/data/drift.py) with any warning, the first
rows of predictions.csv and where the files are. With `predict.fail_on_drift` the flow run fails
after the artifact is made and the files are written.

    prefect deployment run 'batch-predict/champion' --params '{"folder": "inbox"}' --watch
"""

from __future__ import annotations

import csv
import functools
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from components import predict as predict_step
from components.core.params import DEFAULT_PARAMS, Params
from components.data.drift import DriftError
from components.tracking.run import tracked
from flows.parameters import resolve, run_form, with_sections
from flows.pipeline import retry_unless_user_error

ARTIFACT_KEY = "batch-predictions"
SHOWN_ROWS = 20


@task(name="predict", cache_policy=NO_CACHE, retries=3,
      retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5,
      retry_condition_fn=retry_unless_user_error)
def score_folder(params: Params, folder: str, model_uri: str | None) -> dict:
    """The result as a dict; drift that predict.fail_on_drift makes an error comes back as its
    message under `error`, so the flow reports the batch before it fails."""
    step = functools.partial(predict_step.predict, folder=folder, model_uri=model_uri)
    try:
        return asdict(tracked(step, "batch")(params))
    except DriftError as err:
        return asdict(err.result) | {"error": str(err)}


@run_form("search")  # the search's settings do nothing here
@flow(name="batch-predict", log_prints=True)
@with_sections
def batch_predict(
    folder: str = "data/inbox",
    model_uri: str | None = None,
    params_file: str = DEFAULT_PARAMS,
    overrides: list[str] = [],  # noqa: B006 (Prefect copies parameters)
    **sections: Any,
) -> dict[str, Any]:
    """Score every image under `folder` with `model_uri` (default models:/<name>@champion).

    Args:
        folder: the images to score (any depth), relative to the project folder.
        model_uri: a model.pt path or an MLflow URI; empty: models:/<register.model_name>@champion.
        params_file: the settings file, relative to the project folder.
        overrides: `section.key=value` as on the command line.
        sections: per params.yaml section, overrides; empty fields keep the file's values.
    """
    params = resolve(params_file, overrides, **sections)
    result = score_folder(params, folder, model_uri)
    uri = model_uri or f"models:/{params.register.model_name}@champion"
    drifted = "drift" if result["drifted"] else "no drift"
    create_markdown_artifact(key=ARTIFACT_KEY, markdown=predictions_markdown(result, uri, folder),
                             description=f"{result['scored']} images scored with {uri}, "
                                         f"{drifted}")
    if "error" in result:
        raise DriftError(result["error"], result)
    return result


def predictions_markdown(result: dict[str, Any], uri: str, folder: str) -> str:
    with open(result["predictions"], newline="") as f:
        rows = list(csv.DictReader(f))
    counts = Counter(r["class"] for r in rows)
    lines = [f"## {result['scored']} images from `{folder}` scored with `{uri}`", "",
             f"Quarantined: {result['quarantined']} (reasons in `{result['quarantine']}`); "
             f"ignored: {result['ignored']}. All rows: `{Path(result['predictions'])}`.", "",
             "| class | images |", "|---|---|"]
    lines += [f"| {c} | {n} |" for c, n in counts.most_common()]
    lines += drift_markdown(json.loads(Path(result["drift"]).read_text()), result["drift"])
    lines += ["", f"First {min(SHOWN_ROWS, len(rows))} rows:", "",
              "| path | class | confidence |", "|---|---|---|"]
    lines += [f"| {r['path']} | {r['class']} | {float(r['confidence']):.3f} |"
              for r in rows[:SHOWN_ROWS]]
    return "\n".join(lines) + "\n"


def drift_markdown(report: dict[str, Any], path: str) -> list[str]:
    """drift.json as a table of figures against their thresholds, then its warnings and notes."""
    verdict = "**drift**" if report["drift"] else "no drift"
    lines = ["", f"### Drift: {verdict} ({report['images']} images; all figures in `{path}`)", "",
             "| figure | value | threshold | setting | drift |", "|---|---|---|---|---|"]
    for name, fig in report["figures"].items():
        value = "not judged" if fig["value"] is None else f"{fig['value']:.4g}"
        flag = "**yes**" if fig["drift"] else ("-" if fig["value"] is None else "no")
        lines.append(f"| {name} | {value} | {fig['threshold']:g} | `{fig['setting']}` | {flag} |")
    lines += [""] + [f"- warning: {w}" for w in report["warnings"]]
    lines += [f"- note: {n}" for n in report["notes"]]
    return lines
