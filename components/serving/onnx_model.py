"""ONNX files of this project's models: written with the model's meta inside, run by ONNX Runtime.

`write_onnx` exports `checkpoint.Classifier` (uint8 N×H×W×C images in, class probabilities out,
the training normalisation folded in) with torch's exporter (torch.export, then onnxscript), the
batch size dynamic, and stores the model file's meta (classes, image size, channels, resize
policy, smallest side, mean and std, and the drift reference) as JSON in the ONNX model's
metadata, so that an ONNX file, like model.pt, scores new images (and judges drift) with nothing
beside it.

`OnnxClassifier(path)` runs one with ONNX Runtime on the CPU:

    model = OnnxClassifier("outputs/export/model.onnx")
    probs = model.probabilities(images_uint8_nhwc)      # model.meta["classes"] names the columns
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.core.atomic import atomic_file
from components.core.params import UserError
from components.training.checkpoint import Classifier

META_KEY = "cnn_pipeline.meta"  # the ONNX metadata_props key holding the meta as JSON
META_KEYS = ("format", "model", "classes", "image_size", "channels", "resize", "min_side", "mean",
             "std", "epoch", "reference")  # reference: the drift check's (components/data/drift.py)
INPUT, OUTPUT = "images", "probabilities"
# How a registered version's description states a failed parity check (export writes it, register
# keeps it when it writes the description again).
DISAGREES = "ONNX export disagrees with PyTorch"


def write_onnx(net: torch.nn.Module, meta: dict[str, Any], path: str | Path, opset: int) -> Path:
    """`net` with its normalisation as an ONNX file at `path` (atomically)."""
    import onnx

    model = Classifier(net, meta).eval()
    h, w = meta["image_size"]
    # Two images: torch.export would keep a batch dimension it saw as 1 fixed.
    example = torch.zeros((2, int(h), int(w), int(meta["channels"])), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    # The exporter reports its progress on stdout, which is the step's JSON summary.
    with contextlib.redirect_stdout(sys.stderr):
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
            dynamic_shapes={"images": {0: batch}}, opset_version=opset, verbose=False)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {META_KEY: json.dumps(
        {k: meta[k] for k in META_KEYS if k in meta})})
    onnx.checker.check_model(proto)
    path = Path(path)
    with atomic_file(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return path


class OnnxClassifier:
    """An ONNX file written by `write_onnx`, run by ONNX Runtime on the CPU."""

    def __init__(self, path: str | Path, threads: int = 0):
        """`threads`: ONNX Runtime's intra-op threads; 0 lets it choose (one per core)."""
        import onnxruntime as ort

        if not Path(path).is_file():
            raise UserError(f"{path}: no such ONNX file; export one with cnn-pipeline export")
        try:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # ONNX Runtime's own error types: all mean the same here
            raise UserError(f"{path}: ONNX Runtime cannot load it ({err}); export it again with "
                            "cnn-pipeline export") from None
        found = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if found is None:
            raise UserError(f"{path}: an ONNX model without this project's metadata ({META_KEY}): "
                            "its classes and preprocessing are unknown; export it with "
                            "cnn-pipeline export")
        self.meta = json.loads(found)

    def probabilities(self, images: np.ndarray, batch_size: int = 512,
                      tta_flip: bool = False) -> np.ndarray:
        """Class probabilities (N×classes, float32) of uint8 N×H×W×C `images`; with `tta_flip`,
        the mean of each image's and its mirror image's, as training.checkpoint.score does."""
        out = [np.empty((0, len(self.meta["classes"])), np.float32)]
        for i in range(0, len(images), batch_size):
            x = np.ascontiguousarray(images[i:i + batch_size], dtype=np.uint8)
            p = self.session.run([OUTPUT], {INPUT: x})[0]
            if tta_flip:
                p = (p + self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(
                    x[:, :, ::-1])})[0]) / 2
            out.append(p)
        return np.concatenate(out)
