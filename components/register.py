"""register: the trained model into the MLflow registry, and the gate that moves `champion`.

Reads `<paths.train>/model.pt` and run.json (the pipeline's MLflow run), `<paths.evaluate>/
metrics.json` (and, for the model card, classification_report.json, confusion.csv and
`<paths.train>/history.json`) and the test split under `paths.prepared`. Writes
`<paths.register>/decision.json` and model_card.md, and, in MLflow: the model logged to the run, a
version of `register.model_name` tagged with its lineage and test metrics, described by its model
card's summary (components/serving/model_card.py; the card is logged with it), and the aliases
`challenger`, `champion` and `previous-champion`.

    cnn-pipeline register [--params params.yaml]

The model is logged as the served pyfunc of components/serving/pyfunc.py (signature and input
example included): image files in (a column `image` of PNG/JPEG/WebP/BMP bytes) or uint8 N×H×W×C
arrays, and per image its class name, confidence, top-k classes (k = predict.top_k, fixed here with
the served model's limits, predict.max_*) and every class's probability:

    mlflow.pyfunc.load_model("models:/<name>@champion").predict(pd.DataFrame({"image": [png]}))
    mlflow models serve -m "models:/<name>@champion" --env-manager local

Loading the pyfunc runs this project's code, which travels with it (MLflow's models from code and
code_paths); model.pt and its sha256 are its artifact. This step never loads a logged pyfunc: the
gate scores a champion from its model.pt (weights only, hash checked).

The gate. Every version is scored the same way: its model.pt predicting the test split
(accuracy, balanced accuracy, macro F1 and each class's recall), recorded in the version's tag
`gate.scores` with the test split's hash. The challenger replaces the champion when there is none,
or when it beats the champion's `register.primary_metric` by more than 0 and at least
`register.min_improvement`, and no class's recall drops by more than `register.max_class_drop`.
When the champion was scored on other test data, it is loaded and scored on this test split first.
The old champion keeps the alias `previous-champion`. evaluate's metrics.json (which may use
test-time augmentation) goes into the version's tags, not into the comparison.

Exactly once: a version is created at most once per training run (found again by its run id), and
a retried step reuses it and its recorded decision. Pipelines sharing a registry take turns: the
create and the gate run under a lock (`RegistryLock`): a file lock beside the embedded SQLite
store, a tag held in the registry itself behind a server.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
import urllib.parse
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import filelock
import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from sqlalchemy.engine import make_url

from components.core import outputs
from components.core.atomic import atomic_file, write_json
from components.core.params import Params, Register, UserError
from components.core.secrets import shown
from components.data import drift
from components.data.dataset import Split, class_names, load_split, read_manifest
from components.serving import pyfunc
from components.serving.model_card import Version as CardVersion
from components.serving.model_card import model_card
from components.serving.onnx_model import DISAGREES
from components.tracking.lineage import lineage
from components.tracking.run import Tracker
from components.tracking.store import log_with_version
from components.training.checkpoint import Classifier, check_fits, load_model, resolve_model_uri

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


@dataclass
class Scores:
    test_hash: str
    classes: list[str]
    metrics: dict[str, float]
    recall: list[float]  # per class, in `classes` order


def score(predict, test: Split, classes: list[str], test_hash: str) -> Scores:
    """Scores of a probability-predicting function (images in, N×classes out) on a test split,
    fed SCORE_BATCH images at a time."""
    x, y = test.x, np.asarray(test.y)
    pred = np.concatenate([np.empty(0, np.int64)] + [
        np.asarray(predict(x[i:i + SCORE_BATCH])).argmax(1) for i in range(0, len(y), SCORE_BATCH)])
    metrics, recall = gate_metrics(y, pred, len(classes))
    return Scores(test_hash, classes, metrics, recall)


def gate_metrics(y: np.ndarray, pred: np.ndarray, n: int) -> tuple[dict[str, float], list[float]]:
    """Accuracy, balanced accuracy and macro F1 of labels `pred` against `y` (both in
    0..n-1), and each class's recall, from their confusion matrix. The same figures as
    scikit-learn's accuracy_score, balanced_accuracy_score, f1_score(average="macro",
    zero_division=0) and recall_score(average=None, zero_division=0) over labels 0..n-1 (a test
    compares them), without importing scikit-learn, which costs this step more than its scoring."""
    y, pred = np.asarray(y, np.int64), np.asarray(pred, np.int64)
    cm = np.bincount(y * n + pred, minlength=n * n).reshape(n, n)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    recall = np.divide(tp, support, out=np.zeros(n), where=support > 0)
    both = support + predicted  # 2·tp + fp + fn: F1's denominator
    f1 = np.divide(2.0 * tp, both, out=np.zeros(n), where=both > 0)
    metrics = {
        "accuracy": float(tp.sum() / len(y)),
        "balanced_accuracy": float(recall[support > 0].mean()),  # over the classes present
        "f1_macro": float(f1.mean()),
    }
    return metrics, [float(r) for r in recall]


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
    """Mutual exclusion among processes sharing a model registry.

    A registry in a local SQLite file (the embedded default): an OS file lock beside it
    (filelock), taken at once when free, and let go by the OS when a holder dies. Every
    other registry (a server, whatever its database): a registered-model tag, with Fischer's timed
    protocol: read the tag; when it is empty or expired, write a fresh token, wait LOCK_SETTLE_S
    (longer than any contender's read-to-write time), read again: still ours means held. Released
    by deleting the tag; a crashed holder's token expires after LOCK_TTL_S (by wall clock: hosts
    sharing a registry need roughly synchronised clocks). So one registry is reached one way by
    every pipeline that shares it: as the file, or through its server.
    """

    def __init__(self, client: MlflowClient, name: str):
        self.client, self.name, self.token = client, name, None
        self.file = _file_lock(client.tracking_uri, name)

    def _read(self) -> dict | None:
        raw = self.client.get_registered_model(self.name).tags.get(LOCK_TAG)
        return json.loads(raw) if raw else None

    def __enter__(self) -> RegistryLock:
        if self.file is not None:
            try:
                self.file.acquire(timeout=LOCK_WAIT_S)
            except filelock.Timeout:
                raise self._taken(f"the lock file {self.file.lock_file}") from None
            return self
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
        raise self._taken(f"tag {LOCK_TAG}")

    def _taken(self, lock: str) -> UserError:
        return UserError(f"registered model {self.name}: the registry lock ({lock}) stayed taken "
                         f"for {LOCK_WAIT_S:.0f} s; another pipeline is registering, or delete "
                         "the lock if none is")

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.release()
        elif (self._read() or {}).get("token") == self.token:
            self.client.delete_registered_model_tag(self.name, LOCK_TAG)


def _file_lock(tracking_uri: str, name: str) -> filelock.FileLock | None:
    """The OS lock for `name` beside a local SQLite registry's file; None for any other store.
    The address is read by SQLAlchemy, as MLflow's store reads it (a query string included)."""
    if "://" not in tracking_uri:
        return None
    url = make_url(tracking_uri)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    db = Path(url.database).resolve()
    return filelock.FileLock(db.with_name(f"{db.name}.{urllib.parse.quote(name, safe='')}.lock"))


def register(params: Params, tracker: Tracker) -> RegisterResult:
    """Register `params.paths.train`/model.pt under `params.register.model_name`, in the MLflow run
    `tracker` holds (components.tracking.tracked attaches it, and points mlflow's default at its
    server for log_model and `models:/` URIs); see the module doc."""
    cfg, client, name = params.register, tracker.client, params.register.model_name
    meta, test, scores = _challenger(params)
    metrics = _test_metrics(Path(params.paths.evaluate) / outputs.METRICS)
    _ensure_registered_model(client, name)
    found, created = _find_version(client, name, tracker.run_id), False
    decision = None if found is None else _recorded_decision(found)
    if found is None:
        info = _log_model(tracker, params, meta, test)
        tags = _version_tags(params, tracker, meta, metrics, scores)
        seen = _scored_champion(client, name, None, scores, test)
        with RegistryLock(client, name):  # one turn for the new version and its gate
            found = _find_version(client, name, tracker.run_id)  # a concurrent retry's
            if found is None:
                found = client.create_model_version(
                    name, source=info.model_uri, run_id=tracker.run_id, tags=tags,
                    model_id=info.model_id)
                created = True
            decision = _recorded_decision(found) or _decide_locked(
                client, cfg, str(found.version), scores, *seen)
    version = str(found.version)
    decision = decision or _gate(client, cfg, version, scores, test)
    decision |= {"model_name": name, "version": version, "run_id": tracker.run_id,
                 "model_uri": f"models:/{name}/{version}", "created": created}
    path = write_json(Path(params.paths.register) / outputs.DECISION, decision)
    tracker.set_tags({"register.version": version, "register.promoted": decision["promoted"],
                      "register.reasons": "; ".join(decision["reasons"])[:5000]})
    card = _write_card(params, meta, tracker, client.get_model_version(name, version), decision)
    tracker.log_artifacts([path, card], "register")
    return RegisterResult(
        model_name=name, version=version, model_uri=decision["model_uri"], run_id=tracker.run_id,
        created=created, promoted=decision["promoted"], champion=decision["champion"],
        reasons=decision["reasons"], decision_path=str(path))


def _challenger(params: Params) -> tuple[dict[str, Any], Split, Scores]:
    """The trained model's meta (components.training.checkpoint.load_model), the test split, and the
    model's scores on it."""
    net, meta = load_model(Path(params.paths.train) / outputs.MODEL)
    manifest = read_manifest(params.paths.prepared)
    test = load_split(params.paths.prepared, "test")
    if len(test.y) == 0:
        raise UserError(f"{params.paths.prepared}: the test split is empty; the gate compares "
                        "models on it: set data.test_fraction above 0")
    check_fits(meta, manifest, Path(params.paths.train) / outputs.MODEL)
    classes = class_names(manifest)
    scores = score(Classifier(net, meta).probabilities, test, classes,
                   str(manifest.get("hashes", {}).get("test", "unknown")))
    return meta, test, scores


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


def _log_model(tracker: Tracker, params: Params, meta: dict[str, Any], test: Split):
    """The served pyfunc (serving/pyfunc.py) with model.pt as its artifact, logged to the run."""
    import mlflow.pyfunc

    model_pt = Path(params.paths.train) / outputs.MODEL
    # Ending the run prints "View run at" lines: to stderr, as stdout is the step's JSON summary.
    with contextlib.redirect_stdout(sys.stderr), mlflow.start_run(run_id=tracker.run_id):
        return mlflow.pyfunc.log_model(
            name="model", python_model=str(pyfunc.CODE),
            code_paths=[str(Path(pyfunc.__file__).parents[1])],  # the components package
            # model.pt travels with it: `model.checkpoint` and predict start from a registered
            # model, and the gate scores a champion from it, without running the logged code.
            artifacts={pyfunc.ARTIFACT: str(model_pt),
                       pyfunc.ARTIFACT_HASH: str(model_pt) + outputs.HASH_SUFFIX},
            signature=pyfunc.signature(list(meta["classes"])),
            input_example=pyfunc.input_example(test.x[np.arange(2) % len(test.y)]),
            model_config=pyfunc.model_config(params.predict), metadata=pyfunc.metadata(meta),
            pip_requirements=pyfunc.requirements())


def _version_tags(params: Params, tracker: Tracker, meta: dict[str, Any],
                  metrics: dict[str, float], scores: Scores) -> dict[str, str]:
    run_tags = tracker.client.get_run(tracker.run_id).data.tags
    keys = ("git.commit", "git.dirty", "data.hash", "data.name", "data.test_hash", "params.hash")
    found = {k: run_tags[k] for k in keys if k in run_tags}
    tags = found if len(found) == len(keys) else lineage(params)
    tags = {k: v for k, v in tags.items() if not k.startswith("mlflow.")}
    tags |= {"run_id": tracker.run_id, "gate.scores": json.dumps(asdict(scores))}
    # The drift reference model.pt carries, readable on the version without downloading it.
    tags["drift.reference"] = json.dumps(drift.carried(meta))
    tags |= {f"test.{k}": f"{v:.6g}" for k, v in metrics.items()}
    return tags


def _write_card(params: Params, meta: dict[str, Any], tracker: Tracker, found: ModelVersion,
                decision: dict[str, Any]) -> Path:
    """model_card.md, logged with the version's model; its summary the version's description."""
    client = tracker.client
    uri = shown(tracker.uri)
    link = (f"{uri.rstrip('/')}/#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}"
            if uri.startswith(("http://", "https://")) else f"in {uri}")
    run_tags = client.get_run(tracker.run_id).data.tags
    card = model_card(params, meta, CardVersion(
        found.name, str(found.version), decision, dict(found.tags), tracker.run_id, link,
        run_tags.get("train.device")))
    path = Path(params.paths.register) / outputs.MODEL_CARD
    with atomic_file(path) as tmp:
        tmp.write_text(card.text)
    # A disagreeing ONNX export stays stated (export runs after this, not always again).
    notes = [p for p in (found.description or "").split("\n\n") if p.startswith(DISAGREES)]
    client.update_model_version(found.name, found.version,
                                description="\n\n".join([card.summary, *notes]))
    log_with_version(client, found, path)
    return path


def _recorded_decision(found: ModelVersion) -> dict | None:
    raw = found.tags.get("gate.decision")
    return json.loads(raw) if raw else None


def _gate(client: MlflowClient, cfg: Register, version: str, scores: Scores,
          test: Split) -> dict[str, Any]:
    """Decide and move the aliases under the registry lock. The champion is scored outside it
    (that may take a while) and the decision is retried if the champion changed meanwhile."""
    while True:
        seen = _scored_champion(client, cfg.model_name, version, scores, test)
        with RegistryLock(client, cfg.model_name):
            decision = _decide_locked(client, cfg, version, scores, *seen)
        if decision is not None:
            return decision


def _scored_champion(client: MlflowClient, name: str, version: str | None, scores: Scores,
                     test: Split) -> tuple[str | None, tuple[Scores, bool] | None]:
    """The champion now, and its scores on this test split unless it is `version` itself."""
    champion = _champion(client, name)
    if champion is None or champion == version:
        return champion, None
    return champion, _champion_scores(client, name, champion, scores, test)


def _decide_locked(client: MlflowClient, cfg: Register, version: str, scores: Scores,
                   champion: str | None, compared: tuple[Scores, bool] | None) -> dict | None:
    """Under the registry lock: decide on `version` against `champion` as scored before, move
    the aliases and record the decision on the version; None (nothing done) when another
    pipeline moved the champion since it was scored."""
    name = cfg.model_name
    if _champion(client, name) != champion:
        return None
    client.set_registered_model_alias(name, CHALLENGER, version)
    if champion == version:  # a retry after the aliases moved, before the tag
        promoted, reasons, compared = True, ["already the champion"], None
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
    client.set_model_version_tag(name, version, "gate.decision", json.dumps(decision)[:5000])
    return decision


def _champion(client: MlflowClient, name: str) -> str | None:
    found = client.get_registered_model(name).aliases.get(CHAMPION)
    return None if found is None else str(found)


def _champion_scores(client: MlflowClient, name: str, champion: str, scores: Scores,
                     test: Split) -> tuple[Scores, bool]:
    """The champion's scores on this test split, and whether they were computed now: the
    recorded ones when it was scored on the same data (False), else it is loaded and scored
    again (True)."""
    raw = client.get_model_version(name, champion).tags.get("gate.scores")
    recorded = Scores(**json.loads(raw)) if raw else None
    if recorded is not None and recorded.test_hash == scores.test_hash:
        return recorded, False
    # Its model.pt (logged beside it; weights only, hash checked), not mlflow.pyfunc.load_model:
    # that puts a model's logged code first on sys.path and imports the loader its MLmodel names
    # before any pickle check, so an altered registry entry would run code in this step.
    net, meta = load_model(resolve_model_uri(f"models:/{name}/{champion}"))
    return score(Classifier(net, meta).probabilities, test, list(meta["classes"]),
                 scores.test_hash), True
