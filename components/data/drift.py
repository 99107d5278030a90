"""drift: does a batch of new images look like what the model was trained and tested on?

Infrastructure, not a step: train and evaluate call `reference` to measure the test split, batch
prediction (components/predict.py) feeds a `Monitor` chunk by chunk and writes its `report` as
drift.json beside predictions.csv. Reads and writes no file itself.

The reference travels with the model. model.pt (components/training/checkpoint.py, written by train)
carries train's per-channel pixel mean and std, the input size and channels, and `reference`:
the test split scored with the kept weights (predicted-class shares, mean confidence and the
5th-percentile confidence). So a model.pt copied elsewhere, or downloaded from the registry
(its version carries model.pt, and the reference as the tag `drift.reference`), judges a batch
with nothing beside it. Train measures it, after training, on weights already chosen on the
validation split: nothing in training or in choosing the weights depends on the test split.
Evaluate measures the same with its own settings (test-time flips) into its outputs.

The figures, each with its threshold in params.yaml's `predict` section (`predict.drift_<name>`);
a figure above its threshold is drift:
- channel_mean, channel_std: per channel, |batch - train| / train std of the pixel mean and of the
  pixel std, after the same decoding and resize as training (the worst channel is the figure);
- confidence_drop: the test split's mean top-class probability minus the batch's;
- low_confidence: the share of the batch below the test split's 5th-percentile confidence (about
  0.05 for images like the test split's);
- class_distance: the total-variation distance between the shares of predicted classes in the
  batch and on the test split (half the summed absolute differences: 0 same, 1 disjoint; chosen
  over the population stability index because it is bounded, needs no smoothing of a class the
  batch never predicts, and reads as "the share of predictions that would have to change class").
  Judged only from `predict.drift_class_min_per_class` × classes images: by chance alone the
  distance of n images from their own distribution is about 0.4 / sqrt(n / classes) (0.09 at 20
  per class, whatever the number of classes). A folder of one class (one predicted class holds
  ONE_CLASS_SHARE of it) is reported as such and not judged: users score such folders on purpose;
- upscaled: the share of images smaller than the model's input (blown up to it; the smaller side,
  or the larger one for the pad policy, below the input side);
- channel_mismatch: the share of colour images into a grey model, or grey ones into a colour model
  (an image is grey when its colours are, whatever its file's mode).
A model file without a reference (written before these checks, or with an empty test split) is
still scored: the figures it cannot judge say so.

    monitor = Monitor(meta, params.predict, resize="crop", tta_flip=False)
    monitor.add(images_uint8_nhwc, probabilities, seen)   # per chunk
    report = monitor.report()                             # drift.json's contents
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from components.core.params import Predict, UserError

LOW_QUANTILE = 0.05  # the test split's low tail of confidence
ONE_CLASS_SHARE = 0.9  # a folder where one predicted class holds this much is "one class"
METRIC = "total_variation"
FIGURES = ("channel_mean", "channel_std", "confidence_drop", "low_confidence", "class_distance",
           "upscaled", "channel_mismatch")


class DriftError(UserError):
    """predict.fail_on_drift is on and a figure crossed its threshold; `result` is what was
    written (predictions.csv and drift.json are complete)."""

    def __init__(self, message: str, result: Any):
        super().__init__(message)
        self.result = result


def setting(name: str) -> str:
    return f"predict.drift_{name}"


def reference(logp: np.ndarray, classes: list[str], tta_flip: bool = False) -> dict[str, Any]:
    """What a batch is compared with, from the test split's log-probabilities (N×classes)."""
    probs = np.exp(np.asarray(logp, np.float64))
    confidence = probs.max(1)
    shares = np.bincount(probs.argmax(1), minlength=len(classes)) / max(len(probs), 1)
    low = float(np.quantile(confidence, LOW_QUANTILE)) if len(confidence) else 0.0
    return {
        "n": int(len(probs)), "tta_flip": tta_flip,
        "classes": {c: _r(s) for c, s in zip(classes, shares, strict=True)},
        "confidence": {"mean": _r(confidence.mean()) if len(confidence) else None,
                       "low_quantile": LOW_QUANTILE, "low": _r(low),
                       "low_share": _r(np.mean(confidence < low)) if len(confidence) else None},
    }


def carried(meta: dict[str, Any]) -> dict[str, Any]:
    """The reference a model file (or its metadata) carries: train's statistics and input shape,
    and the test split's figures (None for a file written before drift checks)."""
    return {"image_size": list(meta["image_size"]), "channels": int(meta["channels"]),
            "mean": list(meta["mean"]), "std": list(meta["std"]),
            "test": meta.get("reference")}


class Monitor:
    """The running sums of a batch; `report` compares them with the model's reference."""

    def __init__(self, meta: dict[str, Any], cfg: Predict, resize: str = "crop",
                 tta_flip: bool = False):
        self.meta, self.cfg, self.resize, self.tta_flip = meta, cfg, resize, tta_flip
        self.classes = list(meta["classes"])
        channels = int(meta["channels"])
        self.pixels = np.zeros((2, channels))  # per channel: sum, sum of squares (0-1 scale)
        self.count = 0  # pixels per channel
        self.confidence: list[np.ndarray] = []
        self.predicted = np.zeros(len(self.classes), np.int64)
        self.seen: list = []  # components.data.images.Seen per image: size, colour

    def add(self, images: np.ndarray, probs: np.ndarray, seen: list) -> None:
        """A chunk: uint8 N×H×W×C images as scored, their N×classes probabilities, and what
        each file was (components.data.images.Seen)."""
        # Exact integer sums: the squares of uint8 fit uint16, so no float copy of the chunk.
        x = images.reshape(-1, images.shape[-1])
        squares = np.square(x, dtype=np.uint16)
        self.pixels += np.stack([x.sum(0, dtype=np.int64) / 255.0,
                                 squares.sum(0, dtype=np.int64) / 255.0 ** 2])
        self.count += len(x)
        self.confidence.append(probs.max(1))
        self.predicted += np.bincount(probs.argmax(1), minlength=len(self.classes))
        self.seen += seen

    @property
    def n(self) -> int:
        return len(self.seen)

    def report(self) -> dict[str, Any]:
        """drift.json: every figure with its threshold, `drift`, `warnings` and `notes`."""
        ref = self.meta.get("reference") or {}
        notes: list[str] = []
        if self.n == 0:
            notes.append("no image was scored: nothing to judge")
        elif (ref.get("confidence") or {}).get("mean") is None:
            notes.append("the model file carries no test-split reference (written before drift "
                         "checks, or its test split was empty): the figures that need one are "
                         "not judged (the notes below); train it again to add one")
        if self.n and ref and ref.get("tta_flip") != self.tta_flip:
            notes.append(f"confidences scored with evaluate.tta_flip = {self.tta_flip}, the "
                         f"reference with {ref.get('tta_flip')}: the confidence figures compare "
                         "the two")
        figures = {**self._channel_figures(), **self._confidence_figures(ref),
                   "class_distance": self._class_figure(ref, notes),
                   **self._seen_figures()}
        for name, fig in figures.items():
            if not fig["judged"] and fig.get("why_not") and self.n:
                notes.append(f"{name} not judged: {fig['why_not']}")
        warnings = [_warning(name, fig) for name, fig in figures.items() if fig["drift"]]
        return {
            "drift": bool(warnings), "warnings": warnings, "notes": notes, "images": self.n,
            "class_distance_metric": METRIC, "figures": figures, "seen": self._seen_summary(),
            "reference": carried(self.meta),
        }

    def _channel_figures(self) -> dict[str, dict]:
        ref_mean = np.asarray(self.meta["mean"], np.float64)
        ref_std = np.maximum(np.asarray(self.meta["std"], np.float64), 1 / 255)  # a flat set
        if not self.count:
            return {name: _figure(name, None, self.cfg, why_not="no image was scored")
                    for name in ("channel_mean", "channel_std")}
        mean = self.pixels[0] / self.count
        std = np.sqrt(np.maximum(self.pixels[1] / self.count - mean**2, 0.0))
        shift, change = np.abs(mean - ref_mean) / ref_std, np.abs(std - ref_std) / ref_std
        return {
            "channel_mean": _figure("channel_mean", shift.max(), self.cfg, per_channel=_rl(shift),
                                    batch=_rl(mean), train=_rl(ref_mean)),
            "channel_std": _figure("channel_std", change.max(), self.cfg,
                                   per_channel=_rl(change), batch=_rl(std), train=_rl(ref_std)),
        }

    def _confidence_figures(self, ref: dict) -> dict[str, dict]:
        conf = np.concatenate(self.confidence) if self.confidence else np.zeros(0)
        rc = ref.get("confidence") or {}
        why = ("no image was scored" if not len(conf) else
               None if rc.get("mean") is not None else "the model file has no test reference")
        if why:
            return {name: _figure(name, None, self.cfg, why_not=why)
                    for name in ("confidence_drop", "low_confidence")}
        return {
            "confidence_drop": _figure("confidence_drop", rc["mean"] - conf.mean(), self.cfg,
                                       batch=_r(conf.mean()), test=rc["mean"]),
            "low_confidence": _figure("low_confidence", np.mean(conf < rc["low"]), self.cfg,
                                      below=rc["low"], test_share=rc["low_share"]),
        }

    def _class_figure(self, ref: dict, notes: list[str]) -> dict:
        batch = self.predicted / max(self.n, 1)
        shares = {c: _r(s) for c, s in zip(self.classes, batch, strict=True)}
        top = int(np.argmax(batch)) if self.n else 0
        if self.n and batch[top] >= ONE_CLASS_SHARE:
            notes.append(f"one class: {batch[top]:.0%} of the images were predicted "
                         f"{self.classes[top]!r}; a folder of one class is scored as such, its "
                         "class distribution is not called drift")
            return _figure("class_distance", None, self.cfg, batch=shares,
                           one_class=self.classes[top])
        needed = self.cfg.drift_class_min_per_class * len(self.classes)
        why = ("no image was scored" if not self.n else
               "the model file has no test reference" if not ref.get("classes") else
               f"{self.n} images, fewer than {needed} (predict.drift_class_min_per_class = "
               f"{self.cfg.drift_class_min_per_class} × {len(self.classes)} classes)"
               if self.n < needed else None)
        if why:
            return _figure("class_distance", None, self.cfg, why_not=why, batch=shares)
        test = np.array([ref["classes"].get(c, 0.0) for c in self.classes])
        distance = 0.5 * np.abs(batch - test).sum()
        return _figure("class_distance", distance, self.cfg, metric=METRIC, batch=shares,
                       test=ref["classes"], one_class=None)

    def _seen_figures(self) -> dict[str, dict]:
        if not self.seen:
            return {name: _figure(name, None, self.cfg, why_not="no image was scored")
                    for name in ("upscaled", "channel_mismatch")}
        side, channels = int(self.meta["image_size"][0]), int(self.meta["channels"])
        pick = max if self.resize == "pad" else min  # the side that is scaled to the input's
        upscaled = np.mean([pick(s.width, s.height) < side for s in self.seen])
        wrong = np.mean([s.colour != (channels == 3) for s in self.seen])
        other = "colour" if channels == 1 else "grey"
        return {"upscaled": _figure("upscaled", upscaled, self.cfg, input_side=side),
                "channel_mismatch": _figure("channel_mismatch", wrong, self.cfg,
                                            model_channels=channels, counted=other)}

    def _seen_summary(self) -> dict[str, Any]:
        if not self.seen:
            return {}
        w = np.array([s.width for s in self.seen])
        h = np.array([s.height for s in self.seen])
        colour = sum(s.colour for s in self.seen)
        return {"width": _spread(w), "height": _spread(h), "colour": colour,
                "grey": len(self.seen) - colour}


def _figure(name: str, value, cfg: Predict, why_not: str | None = None, **detail) -> dict:
    threshold = getattr(cfg, setting(name).split(".")[1])
    judged = value is not None
    out = {"value": _r(value) if judged else None, "threshold": threshold,
           "setting": setting(name), "judged": judged,
           "drift": bool(judged and value > threshold)}
    if why_not:
        out["why_not"] = why_not
    return out | detail


WHAT = {
    "channel_mean": "the batch's pixel mean is {value:.3g} training stds from training's in its "
                    "worst channel (batch {batch}, train {train})",
    "channel_std": "the batch's pixel std differs from training's by {value:.3g} of it in its "
                   "worst channel (batch {batch}, train {train})",
    "confidence_drop": "mean confidence {batch:.3f} against {test:.3f} on the test split",
    "low_confidence": "{value:.0%} of the images are below the test split's 5th-percentile "
                      "confidence {below:.3f} (about 5% when alike)",
    "class_distance": "the predicted classes differ from the test split's by a total-variation "
                      "distance of {value:.3f}",
    "upscaled": "{value:.0%} of the images are smaller than the model's {input_side}-pixel input",
    "channel_mismatch": "{value:.0%} of the images are {counted} for a {model_channels}-channel "
                        "model",
}


def _warning(name: str, fig: dict) -> str:
    return (f"drift: {name} = {fig['value']:.4g} > {fig['threshold']:g} ({fig['setting']}): "
            + WHAT[name].format(**fig))


def say(report: dict[str, Any], where: str) -> None:
    """Each warning and note on stderr, then one line naming drift.json."""
    for line in report["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    for line in report["notes"]:
        print(f"note: {line}", file=sys.stderr)
    verdict = "DRIFT" if report["drift"] else "no drift"
    print(f"{verdict} in {report['images']} images: {where}", file=sys.stderr)


def tracked_figures(report: dict[str, Any]) -> dict[str, float]:
    """The judged figures and the verdict, as MLflow metrics."""
    out = {f"drift.{name}": fig["value"] for name, fig in report["figures"].items()
           if fig["value"] is not None}
    return out | {"drift": float(report["drift"]), "drift.images": float(report["images"])}


def _spread(values: np.ndarray) -> dict[str, float]:
    return {"min": int(values.min()), "median": float(np.median(values)),
            "max": int(values.max())}


def _r(value) -> float:
    return round(float(value), 6)


def _rl(values) -> list[float]:
    return [_r(v) for v in values]
