"""Every file name the pipeline writes, named once.

The folders come from params.yaml's `paths` section; the names of the files in them are here, and
every step, tracking, the flows, the tests and dvc.yaml's outputs use these (tests/test_files.py
checks that no other module spells one of them, and that dvc.yaml's outputs are among them).

    paths.prepared     {split}_x.npy, {split}_y.npy, MANIFEST, QUARANTINE       (prepare)
    paths.augment      POLICY, PREVIEW                                         (augment)
    paths.train        MODEL (+ HASH_SUFFIX), HISTORY, RUN, PENDING,            (train)
                       CHECKPOINTS/ LAST, BEST; DDP/ STARTED, RESULT, STOP, logs/
    paths.evaluate     METRICS, REPORT_JSON, REPORT_TXT, PREDICTIONS, CONFUSION_CSV,
                       CALIBRATION_CSV, CONFUSION_PNG, CONFUSION_NORMALIZED_PNG,
                       CALIBRATION_PNG, MISTAKES_PNG, CURVES_PNG, REFERENCE     (evaluate)
    paths.register     DECISION, MODEL_CARD                                    (register)
    paths.predictions  PREDICTIONS, QUARANTINE, DRIFT                          (predict)
    paths.export       ONNX, EXPORT                                            (export)
    (any step folder)  PENDING: what the MLflow server did not take yet (train's, predict's, or
                       a step's own when its inputs are read-only; components/tracking/)
    (--out)            KFP_PIPELINE                                (flows/kubeflow/compiler.py)
    paths.search       STUDY_DB; <study>/trial-<n>/ a trial's step folders, TRIAL_LOG (search)
"""

from __future__ import annotations

# prepare
MANIFEST = "manifest.json"  # classes, counts, statistics, hashes: what every later step reads
QUARANTINE = "quarantine.json"  # rejected image files and why (prepare and predict)
POOL = "pool.npy"  # scratch: an image folder's decoded pixels before the split, removed after


def x_file(split: str) -> str:
    return f"{split}_x.npy"


def y_file(split: str) -> str:
    return f"{split}_y.npy"


# augment
POLICY = "policy.json"
PREVIEW = "preview.png"

# train
MODEL = "model.pt"
HASH_SUFFIX = ".sha256"  # beside every model and checkpoint file: sha256sum's format
HISTORY = "history.json"
CHECKPOINTS = "checkpoints"  # a folder: LAST and BEST
LAST = "last.pt"
BEST = "best.pt"
RUN = "run.json"  # the pipeline's MLflow run: train starts it, evaluate and register join it
PENDING = "mlflow-pending.json"  # what an unreachable tracking server has not received yet
DDP = "ddp"  # a folder: what the parent and the torchrun workers hand each other
STARTED = "started.json"
RESULT = "result.json"
STOP = "stop.json"  # the parent's callbacks asked the workers to stop (train.StopTraining)

# evaluate
METRICS = "metrics.json"
REPORT_JSON = "classification_report.json"
REPORT_TXT = "classification_report.txt"
PREDICTIONS = "predictions.csv"  # evaluate's test-split predictions, predict's batch predictions
CONFUSION_CSV = "confusion.csv"
CALIBRATION_CSV = "calibration.csv"
CONFUSION_PNG = "confusion.png"
CONFUSION_NORMALIZED_PNG = "confusion_normalized.png"
CALIBRATION_PNG = "calibration.png"
MISTAKES_PNG = "mistakes.png"
CURVES_PNG = "curves.png"
REFERENCE = "reference.json"  # what batch prediction's drift check compares with (drift.py)

EVALUATE = (METRICS, REPORT_JSON, REPORT_TXT, PREDICTIONS, CONFUSION_CSV, CALIBRATION_CSV,
            CONFUSION_PNG, CONFUSION_NORMALIZED_PNG, CALIBRATION_PNG, MISTAKES_PNG, CURVES_PNG,
            REFERENCE)

# register
DECISION = "decision.json"
MODEL_CARD = "model_card.md"  # also logged with the version; its summary is the description

# export
ONNX = "model.onnx"  # also logged with the registered version
EXPORT = "export.json"  # the parity check's figures and verdict

# flows/kubeflow/compiler.py compile: the Kubeflow pipeline (KFP IR YAML), where --out says
KFP_PIPELINE = "pipeline.yaml"

# predict
DRIFT = "drift.json"  # how the scored folder compares with the model's data (drift.py)

# search (flows/search/workers.py): the study's SQLite file and the trials in paths.search; the
# pictures and tables on the search's MLflow parent run
STUDY_DB = "optuna.db"
TRIAL_LOG = "trial.log"  # a trial's training process's messages, in its trial folder
PREPARED_KEY = "prepared-key.json"  # what a local search's prepared data was made from
HISTORY_PNG = "optimization_history.png"
IMPORTANCES_PNG = "param_importances.png"
PARALLEL_PNG = "parallel_coordinate.png"
TRIALS_CSV = "trials.csv"


def names() -> dict[str, str]:
    """Every name above, by its constant's name."""
    return {k: v for k, v in globals().items() if k.isupper() and isinstance(v, str)}
