"""register: the trained model into the MLflow registry, and the gate that moves `champion`.

Reads `<paths.train>/model.pt` and run.json (the pipeline's MLflow run), `<paths.evaluate>/
metrics.json` and the test split under `paths.prepared`. Writes `<paths.register>/decision.json`
and, in MLflow: the model logged to the run, a version of `register.model_name` tagged with its
lineage and test metrics, and the aliases `challenger`, `champion` and `previous-champion`.

    python -m components.register [--params params.yaml]

The model is logged with `mlflow.pytorch` (signature and input example included) wrapped so that
it takes raw uint8 N×H×W×C images and returns class probabilities:
`mlflow.pyfunc.load_model("models:/<name>@champion").predict(images)` needs no preprocessing.
It is saved as a torch.export program (no pickled classes: loading needs torch, not this
project's code); a model that torch.export cannot trace is pickled with this project's code.

The gate. Every version is scored the same way: its logged model predicting the test split
(accuracy, balanced accuracy, macro F1 and each class's recall), recorded in the version's tag
`gate.scores` with the test split's hash. The challenger replaces the champion when there is none,
or when it beats the champion's `register.primary_metric` by more than 0 and at least
`register.min_improvement`, and no class's recall drops by more than `register.max_class_drop`.
When the champion was scored on other test data, it is loaded and scored on this test split first.
The old champion keeps the alias `previous-champion`. evaluate's metrics.json (which may use
test-time augmentation) goes into the version's tags, not into the comparison.

Exactly once: a version is created at most once per training run (found again by its run id), and
a retried step reuses it and its recorded decision. Pipelines sharing a registry take turns: the
create and the gate run under a lock held in the registry itself (`RegistryLock`).
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from importlib.metadata import version as installed
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from components.atomic import write_json
from components.checkpoint import load_model, resolve_model_uri, scale_shift
from components.params import Params, Register, UserError, run_step
from components.prepared import Split, class_names, load_split, read_manifest
from components.tracking import Tracker, lineage

DECISION_FILE = "decision.json"
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
SCORE_BATCH = 1024
LOCK_TAG = "gate.lock"
LOCK_SETTLE_S = 1.5  # Fischer's delay: longer than any contender's read-to-write time
LOCK_TTL_S = 60.0  # a crashed holder's lock expires after this; the gate itself takes seconds
LOCK_WAIT_S = 600.0
EPS = 1e-9  # metric comparisons are of averages over the same images: no finer differences


@dataclass
class RegisterResult:
    model_name: str
    version: str
    model_uri: str
    run_id: str
    created: bool  # False: a retry found the version its first attempt made
    promoted: bool
    champion: str | None
    reasons: list[str]
    decision_path: str


class Classifier(torch.nn.Module):
    """uint8 N×H×W×C images in, class probabilities out: the training normalisation travels
    inside the logged model."""

    def __init__(self, net: torch.nn.Module, meta: dict[str, Any]):
        super().__init__()
        self.net = net.eval()
        scale, shift = scale_shift(meta["mean"], meta["std"])
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift, images.permute(0, 3, 1, 2).float(), self.scale)
        return self.net(x).float().softmax(dim=1)


@dataclass
class Scores:
    test_hash: str
    classes: list[str]
    metrics: dict[str, float]
    recall: list[float]  # per class, in `classes` order


def score(predict, test: Split, classes: list[str], test_hash: str) -> Scores:
    """Scores of a probability-predicting function on a test split."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score

    x, y = np.asarray(test.x), np.asarray(test.y)
    # Writable copies, batch by batch: torch refuses read-only memory maps.
    pred = np.concatenate([np.asarray(predict(np.array(x[i:i + SCORE_BATCH]))).argmax(1)
                           for i in range(0, len(y), SCORE_BATCH)])
    labels = list(range(len(classes)))
    metrics = {
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "f1_macro": f1_score(y, pred, labels=labels, average="macro", zero_division=0),
    }
    recall = recall_score(y, pred, labels=labels, average=None, zero_division=0)
    return Scores(test_hash, classes, {k: float(v) for k, v in metrics.items()},
                  [float(r) for r in recall])


def decide(challenger: Scores, champion: Scores | None, cfg: Register) -> tuple[bool, list[str]]:
    """Whether the challenger replaces the champion, and why (both scored on the same data)."""
    if champion is None:
        return True, ["no champion yet"]
    if champion.classes != challenger.classes:
        return False, [f"the champion predicts other classes ({', '.join(champion.classes)}); "
                       "move the alias by hand or use another register.model_name"]
    m = cfg.primary_metric
    new, old = challenger.metrics[m], champion.metrics[m]
    gain = new - old
    beats = gain > EPS and gain >= cfg.min_improvement - EPS
    reasons = [f"{m} {new:.4f} vs champion's {old:.4f} ({gain:+.4f}): "
               + ("beats it" if beats else "does not beat it")
               + f" (needs more than 0 and at least {cfg.min_improvement:g})"]
    drops = [f"{c} {o:.3f}->{n:.3f}" for c, o, n in zip(challenger.classes, champion.recall,
                                                       challenger.recall, strict=True)
             if o - n > cfg.max_class_drop + EPS]
    if drops:
        reasons.append(f"recall drops by more than {cfg.max_class_drop:g} for: "
                       + ", ".join(drops))
    else:
        reasons.append(f"no class's recall drops by more than {cfg.max_class_drop:g}")
    return beats and not drops, reasons


class RegistryLock:
    """Mutual exclusion among processes sharing a model registry, held in a registered-model tag.

    Fischer's timed protocol: read the tag; when it is empty or expired, write a fresh token,
    wait LOCK_SETTLE_S (longer than any contender's read-to-write time), read again: still ours
    means held. Released by deleting the tag; a crashed holder's token expires after LOCK_TTL_S
    (by wall clock: hosts sharing a registry need roughly synchronised clocks).
    """

    def __init__(self, client: MlflowClient, name: str):
        self.client, self.name, self.token = client, name, None

    def _read(self) -> dict | None:
        raw = self.client.get_registered_model(self.name).tags.get(LOCK_TAG)
        return json.loads(raw) if raw else None

    def __enter__(self) -> RegistryLock:
        deadline = time.monotonic() + LOCK_WAIT_S
        while time.monotonic() < deadline:
            started = time.monotonic()
            holder = self._read()
            if holder is None or holder["expires"] < time.time():
                token = uuid.uuid4().hex
                try:
                    self.client.set_registered_model_tag(self.name, LOCK_TAG, json.dumps(
                        {"token": token, "expires": time.time() + LOCK_TTL_S}))
                except MlflowException:
                    # The server writes a new tag by read-then-insert: a contender inserting at
                    # the same moment makes ours fail on the unique key. Theirs stands; back off.
                    time.sleep(random.uniform(0.2, 0.8))
                    continue
                # A write slower than the settle time could land after a contender's check;
                # then ours is not safe to claim, and it is left to expire.
                if time.monotonic() - started < LOCK_SETTLE_S:
                    time.sleep(LOCK_SETTLE_S)
                    if (self._read() or {}).get("token") == token:
                        self.token = token
                        return self
            time.sleep(random.uniform(0.2, 0.8))
        raise UserError(f"registered model {self.name}: the registry lock (tag {LOCK_TAG}) stayed "
                        f"taken for {LOCK_WAIT_S:.0f} s; another pipeline is registering, or "
                        "delete the tag if none is")

    def __exit__(self, *exc) -> None:
        if (self._read() or {}).get("token") == self.token:
            self.client.delete_registered_model_tag(self.name, LOCK_TAG)


def register(params: Params, tracker: Tracker | None = None) -> RegisterResult:
    """Register `params.paths.train`/model.pt under `params.register.model_name`; see the doc."""
    own = tracker is None
    tracker = tracker or Tracker.resume(params)
    try:
        result = _register(params, tracker)
    except BaseException:
        if own:
            tracker.close("FAILED")
        raise
    if own:
        tracker.close()
    return result


def _register(params: Params, tracker: Tracker) -> RegisterResult:
    import mlflow

    mlflow.set_tracking_uri(tracker.uri)  # for log_model and loading the champion
    cfg, client, name = params.register, tracker.client, params.register.model_name
    model, test, scores = _challenger(params)
    metrics = _test_metrics(Path(params.paths.evaluate) / "metrics.json")
    _ensure_registered_model(client, name)
    found, created = _find_version(client, name, tracker.run_id), False
    if found is None:
        info = _log_model(tracker, model, test, scores.classes, Path(params.paths.train))
        tags = _version_tags(params, tracker, metrics, scores)
        with RegistryLock(client, name):
            found = _find_version(client, name, tracker.run_id)  # a concurrent retry's
            if found is None:
                found = client.create_model_version(
                    name, source=info.model_uri, run_id=tracker.run_id, tags=tags,
                    model_id=info.model_id)
                created = True
    version = str(found.version)
    decision = _recorded_decision(found) or _gate(client, cfg, version, scores, test)
    decision |= {"model_name": name, "version": version, "run_id": tracker.run_id,
                 "model_uri": f"models:/{name}/{version}", "created": created}
    path = write_json(Path(params.paths.register) / DECISION_FILE, decision)
    tracker.set_tags({"register.version": version, "register.promoted": decision["promoted"],
                      "register.reasons": "; ".join(decision["reasons"])[:5000]})
    tracker.log_artifacts([path], "register")
    return RegisterResult(
        model_name=name, version=version, model_uri=decision["model_uri"], run_id=tracker.run_id,
        created=created, promoted=decision["promoted"], champion=decision["champion"],
        reasons=decision["reasons"], decision_path=str(path))


def _challenger(params: Params) -> tuple[Classifier, Split, Scores]:
    """The trained model, wrapped for raw images, and its scores on the test split."""
    net, meta = load_model(Path(params.paths.train) / "model.pt")
    manifest = read_manifest(params.paths.prepared)
    test = load_split(params.paths.prepared, "test")
    if len(test.y) == 0:
        raise UserError(f"{params.paths.prepared}: the test split is empty; the gate compares "
                        "models on it: set data.test_fraction above 0")
    classes = class_names(manifest)
    if list(meta["classes"]) != classes:
        raise UserError(f"{params.paths.train}/model.pt predicts {meta['classes']}, the prepared "
                        f"data has {classes}: run train again")
    model = Classifier(net, meta)
    with torch.no_grad():
        scores = score(lambda x: model(torch.from_numpy(x)).numpy(), test, classes,
                       str(manifest.get("hashes", {}).get("test", "unknown")))
    return model, test, scores


def _test_metrics(path: Path) -> dict[str, float]:
    if not path.is_file():
        raise UserError(f"{path}: no test metrics; run the evaluate step first")
    raw = json.loads(path.read_text())
    return {k: float(v) for k, v in raw.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name, description="Image classifier; the `champion` alias "
                                       "is the one to use (components/register.py's gate).")
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def _find_version(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """The version this training run already made (by run id, which creation sets itself)."""
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def _log_model(tracker: Tracker, model: Classifier, test: Split, classes: list[str],
               train_dir: Path):
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    _, h, w, c = test.x.shape
    signature = ModelSignature(
        # Unnamed: a named tensor reaches the model as a dict, which the pytorch flavor refuses.
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, h, w, c))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(classes)))]),
    )
    common = {
        "name": "model", "signature": signature, "metadata": {"classes": classes},
        # Two images: torch.export keeps a batch dimension seen as 1 fixed.
        "input_example": np.array(test.x[np.arange(2) % len(test.y)]),
        "pip_requirements": [f"{p}=={installed(p)}" for p in ("torch", "numpy", "mlflow")],
        # model.pt travels with it: `model.checkpoint` and predict start from a registered model.
        "extra_files": [str(train_dir / "model.pt"), str(train_dir / "model.pt.sha256")],
    }
    # Ending the run prints "View run at" lines: to stderr, as stdout is the step's JSON summary.
    with contextlib.redirect_stdout(sys.stderr), mlflow.start_run(run_id=tracker.run_id):
        try:  # torch.export's program: no pickled classes, no project code needed to load it
            return mlflow.pytorch.log_model(model, serialization_format="pt2", **common)
        except Exception as err:  # not every model traces; pickling takes any
            print(f"torch.export could not trace the model ({err}); logging it pickled, with "
                  "this project's code", file=sys.stderr)
        packages = ("torch", "timm", "numpy", "pydantic", "pyyaml", "mlflow")
        return mlflow.pytorch.log_model(
            model, serialization_format="pickle", code_paths=[str(Path(__file__).parent)],
            **common | {"pip_requirements": [f"{p}=={installed(p)}" for p in packages]})


def _version_tags(params: Params, tracker: Tracker, metrics: dict[str, float],
                  scores: Scores) -> dict[str, str]:
    run_tags = tracker.client.get_run(tracker.run_id).data.tags
    keys = ("git.commit", "git.dirty", "data.hash", "data.name", "data.test_hash", "params.hash")
    found = {k: run_tags[k] for k in keys if k in run_tags}
    tags = found if len(found) == len(keys) else lineage(params)
    tags = {k: v for k, v in tags.items() if not k.startswith("mlflow.")}
    tags |= {"run_id": tracker.run_id, "gate.scores": json.dumps(asdict(scores))}
    tags |= {f"test.{k}": f"{v:.6g}" for k, v in metrics.items()}
    return tags


def _recorded_decision(found: ModelVersion) -> dict | None:
    raw = found.tags.get("gate.decision")
    return json.loads(raw) if raw else None


def _gate(client: MlflowClient, cfg: Register, version: str, scores: Scores,
          test: Split) -> dict[str, Any]:
    """Decide and move the aliases under the registry lock. The champion is scored outside it
    (that may take a while) and the decision is retried if the champion changed meanwhile."""
    name = cfg.model_name
    while True:
        champion = _champion(client, name)
        compared = None
        if champion is not None and champion != version:
            compared = _champion_scores(client, name, champion, scores, test)
        with RegistryLock(client, name):
            if _champion(client, name) != champion:
                continue  # another pipeline moved it while we scored: compare with the new one
            client.set_registered_model_alias(name, CHALLENGER, version)
            if champion == version:  # a retry after the aliases moved, before the tag
                promoted, reasons = True, ["already the champion"]
            else:
                promoted, reasons = decide(scores, compared[0] if compared else None, cfg)
            if promoted and champion not in (None, version):
                client.set_registered_model_alias(name, PREVIOUS, champion)
            if promoted:
                client.set_registered_model_alias(name, CHAMPION, version)
            decision = {
                "promoted": promoted, "reasons": reasons, "primary_metric": cfg.primary_metric,
                "champion": version if promoted else champion,
                "previous_champion": champion if promoted and champion != version else None,
                "challenger_scores": asdict(scores),
                "compared_with": None if not compared else {
                    "version": champion, "rescored": compared[1], "scores": asdict(compared[0])},
                "decided_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            client.set_model_version_tag(name, version, "gate.decision",
                                         json.dumps(decision)[:5000])
            return decision


def _champion(client: MlflowClient, name: str) -> str | None:
    found = client.get_registered_model(name).aliases.get(CHAMPION)
    return None if found is None else str(found)


def _champion_scores(client: MlflowClient, name: str, champion: str, scores: Scores,
                     test: Split) -> tuple[Scores, bool]:
    """The champion's scores on this test split: recorded ones when it was scored on the same
    data, else (False) it is loaded and scored again (True)."""
    raw = client.get_model_version(name, champion).tags.get("gate.scores")
    recorded = Scores(**json.loads(raw)) if raw else None
    if recorded is not None and recorded.test_hash == scores.test_hash:
        return recorded, False
    # Its model.pt (logged beside it; weights only, hash checked), not mlflow.pyfunc.load_model:
    # that puts a model's logged code first on sys.path and imports the loader its MLmodel names
    # before any pickle check, so an altered registry entry would run code in this step.
    net, meta = load_model(resolve_model_uri(f"models:/{name}/{champion}"))
    model = Classifier(net, meta)
    with torch.no_grad():
        return score(lambda x: model(torch.from_numpy(x)).numpy(), test, list(meta["classes"]),
                     scores.test_hash), True


def main(argv: list[str] | None = None) -> None:
    run_step(register, argv)


if __name__ == "__main__":
    main()
