"""batch-predict: score a folder of images with a registered model (default: the champion).

Wraps `components.predict.predict` as a task; loading `models:/...` talks to MLflow, so it is
retried with backoff. Leaves a markdown artifact `batch-predictions`: counts, the classes
predicted, the first rows of predictions.csv and where the file is.

    prefect deployment run 'batch-predict/champion' --params '{"folder": "inbox"}' --watch
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from components import predict as predict_step
from components.params import DEFAULT_PARAMS, Params
from flows.pipeline import retry_unless_user_error
from flows.settings import (
    DataOverrides,
    EvaluateOverrides,
    PathsOverrides,
    RegisterOverrides,
    resolve,
)

ARTIFACT_KEY = "batch-predictions"
SHOWN_ROWS = 20


@task(name="predict", cache_policy=NO_CACHE, retries=3,
      retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5,
      retry_condition_fn=retry_unless_user_error)
def score_folder(params: Params, folder: str, model_uri: str | None, top_k: int) -> dict:
    return asdict(predict_step.predict(params, folder=folder, model_uri=model_uri, top_k=top_k))


@flow(name="batch-predict", log_prints=True)
def batch_predict(
    folder: str = "data/inbox",
    model_uri: str | None = None,
    top_k: int = 5,
    params_file: str = DEFAULT_PARAMS,
    paths: PathsOverrides = PathsOverrides(),
    data: DataOverrides = DataOverrides(),
    evaluate: EvaluateOverrides = EvaluateOverrides(),
    register: RegisterOverrides = RegisterOverrides(),
) -> dict[str, Any]:
    """Score every image under `folder` with `model_uri` (default models:/<name>@champion)."""
    params = resolve(params_file, paths=paths, data=data, evaluate=evaluate, register=register)
    result = score_folder(params, folder, model_uri, top_k)
    uri = model_uri or f"models:/{params.register.model_name}@champion"
    create_markdown_artifact(key=ARTIFACT_KEY, markdown=predictions_markdown(result, uri, folder),
                             description=f"{result['scored']} images scored with {uri}")
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
    lines += ["", f"First {min(SHOWN_ROWS, len(rows))} rows:", "",
              "| path | class | confidence |", "|---|---|---|"]
    lines += [f"| {r['path']} | {r['class']} | {float(r['confidence']):.3f} |"
              for r in rows[:SHOWN_ROWS]]
    return "\n".join(lines) + "\n"
