"""The served model: image files (or uint8 arrays) in, class names out; an MLflow pyfunc.

register logs it with `mlflow.pyfunc.log_model` as a model from code:
components/serving/model_code.py is the code MLflow runs to load it, this project's components/
package travels in the model's code/ folder (code_paths), and model.pt (with its sha256) is its one
artifact. Loading the pyfunc therefore runs this project's code: fine for a registry you own. The
register gate, evaluate and predict never load it: they read model.pt alone (weights only, hash
checked).

model.pt carries everything preprocessing needs (classes, image size, channels, resize policy,
smallest side, normalisation), so a served image is decoded by `components.data.images.decode`
exactly as prepare and predict decode files, and normalised inside the model as in training.

Input, in any of MLflow's JSON forms (dataframe_split, dataframe_records, inputs, instances):
- a column `image` of base64-encoded PNG, JPEG, WebP or BMP file bytes (what the signature and
  the input example declare): `{"dataframe_records": [{"image": "iVBORw0KGgo..."}]}` or
  `{"inputs": {"image": ["iVBORw0KGgo...", ...]}}`;
- uint8 pixel arrays, N×H×W×C at the model's size, the second form (a signature holds one):
  `{"inputs": [[[[0], [13], ...], ...], ...]}`.
In Python: `mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": [png_bytes]}))`, and
`.unwrap_python_model().classify(uint8_images)` for arrays.

`mlflow models predict -m models:/<name>@champion -i input.json -t json --env-manager local`
takes the same JSON: MLflow's CLI parses it its own way (by the signature's binary column) and
hands `predict` a DataFrame whose `image` cells are the files' bytes (the dataframe forms: MLflow
decodes their base64), the base64 text itself (inputs, instances) or, for arrays, nested lists of
the numbers' text; `predict` takes each (`file_bytes`, `pixels`).

Cost is bounded before anything is decoded: the number of images (predict.max_batch), the body's
size (predict.max_request_mb), and the pixels each image and all of a request's images decode to
(predict.max_image_mp, predict.max_request_mp), read from each file's header (Pillow opens
lazily), whatever the format compresses them to. bench/bench_serve.py measures the largest
request these allow. Concurrent requests each cost that much: bound them in front of the server
where clients are not trusted.

Output, one row per image: `class` (its name), `confidence` (its probability), `top_k` (the k most
likely, [{"class", "probability"}], k = predict.top_k when registered) and `probabilities` (every
class's, in the order of the model's metadata `classes`).

Served by `mlflow models serve -m models:/<name>@champion --env-manager local`. MLflow's scoring
server answers an exception with its stack trace, a schema error and JSON it cannot parse with
the request itself, and a RecursionError (deeply nested JSON) with a 500; it has no 413. So the
model keeps its own handler: when the server loads this model, `guard` puts `handle` in front of
the server's (the function its /invocations route calls): the body's size
(predict.max_request_mb), its content type, the JSON, the number of images (predict.max_batch),
each image's base64 or the arrays' shape and type are checked, then the images go through
MLflow's pyfunc predict (its schema check, then `ImageClassifier.predict`, as for the CLI). A bad
request gets a 4xx whose body is {"error_code", "message"}: our message, naming the problem,
without a traceback, anything of the request or any setting; an unexpected failure gets a 500
saying only that (the server's log has the traceback). The limits are the model's model_config,
fixed at registration from the `predict` settings under their params.yaml names (MLflow also
logs a model_config as the run's params, so they are the run's own `predict.*` params, not a
second spelling of them); `MLFLOW_PYFUNC_INFERENCE_CONFIG='{"predict.max_batch": 64}'`
overrides them for one server, `mlflow.pyfunc.load_model(uri, model_config={...})` in Python.
The body is refused by size after the server has read it: cap it upstream too (a proxy's
client_max_body_size) where clients are not trusted.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
import re
import struct
import sys
from importlib.metadata import version as installed
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel
from PIL import Image

from components.core.params import Data, ParamsError, Predict, validate
from components.data.images import BadImage, decode
from components.training.checkpoint import Classifier, load_model

CODE = Path(__file__).with_name("model_code.py")  # what MLflow runs to load the model
LOADED_BY_NAME = ("components.serving.model_code",)  # MLflow loads CODE by its path
COLUMN = "image"
FORMATS = ("PNG", "JPEG", "WEBP", "BMP")  # Pillow's names; nothing else is opened from a request
ARTIFACT, ARTIFACT_HASH = "model", "model_sha256"  # model.pt and its sha256 among the artifacts
# A model_config's keys: the predict settings it may hold, by their dotted names.
CONFIG_KEYS = ("predict.top_k", "predict.max_batch", "predict.max_request_mb",
               "predict.max_image_mp", "predict.max_request_mp")
JSON_FORMATS = ("dataframe_split", "dataframe_records", "inputs", "instances")
BATCH = 64  # images per forward pass: memory stays flat for a max_batch request
MB = MP = 1_000_000  # a megabyte, a megapixel
# Base64 text, wrapped or not. A PNG, JPEG, WebP or BMP file holds bytes outside this alphabet
# within its first few (a PNG's or JPEG's first, a BMP's or WebP's binary header fields, their
# compressed data), so a file is not taken for base64.
BASE64 = re.compile(rb"[A-Za-z0-9+/\s]*={0,2}\s*")
REQUIREMENTS = ("mlflow", "torch", "timm", "numpy", "pandas", "pillow", "pydantic", "pyyaml")
ERROR_CODES = {400: "BAD_REQUEST", 413: "REQUEST_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE",
               500: "INTERNAL_ERROR"}
EXAMPLE = ('e.g. {"inputs": {"image": ["<base64 of a PNG file>"]}}, or uint8 arrays as '
           '{"inputs": [<N×H×W×C nested lists>]}')
log = logging.getLogger(__name__)


class BadRequest(ValueError):
    """A request the model cannot answer; `status` is the HTTP status the server replies with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message, self.status = message, status


class ImageClassifier(PythonModel):
    """The pyfunc (see the module doc)."""

    def load_context(self, context) -> None:
        net, self.meta = load_model(context.artifacts[ARTIFACT])
        self.model = Classifier(net, self.meta)
        self.limits = limits(context.model_config)
        self.classes = [str(c) for c in self.meta["classes"]]
        h, w = (int(s) for s in self.meta["image_size"])
        self.shape = (h, w, int(self.meta["channels"]))
        self.resize = self.meta.get("resize") or Data().resize
        self.min_side = self.meta.get("min_side") or Data().min_side
        guard()

    # The hint names what MLflow hands over (a DataFrame: MLflow infers no schema from it and
    # keeps the signature register gives); a uint8 N×H×W×C array is taken too.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """One row per image of `model_input`: a DataFrame whose `image` column holds image files
        (their bytes or base64) or H×W×C arrays (as MLflow's CLI hands `{"inputs": [...]}`), or
        a uint8 N×H×W×C array."""
        if isinstance(model_input, np.ndarray):
            return self.classify(model_input)
        cells = list(model_input[COLUMN])
        if cells and all(isinstance(cell, list | np.ndarray) for cell in cells):
            return self.classify(cells)
        return self.classify(self.decode(cells))

    def decode(self, cells: list) -> np.ndarray:
        """Image files (bytes or base64) as uint8 N×H×W×C, decoded as prepare decodes files,
        once their headers are within the pixel limits."""
        blobs = [file_bytes(i, cell) for i, cell in enumerate(cells)]
        check_pixels(blobs, self.limits)
        h, _, c = self.shape
        images = []
        for i, blob in enumerate(blobs):
            try:
                images.append(decode(blob, h, c, self.resize, self.min_side, FORMATS))
            except BadImage as bad:
                raise BadRequest(f"image {i}: {bad.reason}: {bad.detail}") from None
        return np.stack(images) if images else np.zeros((0, *self.shape), np.uint8)

    def classify(self, images: Any) -> pd.DataFrame:
        """One row per image of uint8 N×H×W×C `images`, checked by `pixels` (see the module doc)."""
        probs = self.model.probabilities(pixels(images, self.shape), BATCH)
        return table(probs, self.classes, self.limits.top_k)


def limits(config: dict[str, Any] | None) -> Predict:
    """The serving limits of a model_config, validated like params.yaml's predict section."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ParamsError(f"the served model's model_config has unknown keys {unknown}: "
                          f"use {list(CONFIG_KEYS)}")
    given = {k.removeprefix("predict."): v for k, v in config.items()}
    return validate({"predict": given}, source="the served model's model_config").predict


def file_bytes(i: int, cell: Any) -> bytes:
    """Image `i`'s file bytes from a cell holding them or their base64 (see the module doc)."""
    if isinstance(cell, str) or (isinstance(cell, bytes) and BASE64.fullmatch(cell)):
        return _unbase64(i, cell)
    if isinstance(cell, bytes | bytearray):
        return bytes(cell)
    raise BadRequest(f"image {i}: expected image file bytes or their base64, got "
                     f"{type(cell).__name__}")


def check_pixels(blobs: list[bytes], cfg: Predict) -> None:
    """413 when an image, or a request's images together, would decode to more pixels than the
    limits allow; from the headers alone."""
    total = 0.0
    for i, blob in enumerate(blobs):
        mp, said = _megapixels(blob)
        if mp > cfg.max_image_mp:
            raise BadRequest(f"image {i} is {said}, over the served model's limit of "
                             f"{cfg.max_image_mp:g} per image (predict.max_image_mp); send "
                             "smaller images", 413)
        total += mp
    if total > cfg.max_request_mp:
        raise BadRequest(f"the request's images total {total:.1f} megapixels, over the served "
                         f"model's limit of {cfg.max_request_mp:g} per request "
                         "(predict.max_request_mp); send fewer images per request", 413)


def _megapixels(blob: bytes) -> tuple[float, str]:
    """The megapixels a file's header says it decodes to, and that said for a person; (0, "")
    where Pillow opens no image (decoding it then names what is wrong)."""
    try:
        with Image.open(io.BytesIO(blob), formats=FORMATS) as img:
            w, h = img.size
    except Image.DecompressionBombError:  # Pillow opens nothing over twice its limit
        return math.inf, (f"over {2 * Image.MAX_IMAGE_PIXELS / MP:.0f} megapixels (Pillow's "
                          "decompression-bomb limit)")
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error):
        return 0.0, ""
    return w * h / MP, f"{w}×{h} = {w * h / MP:.1f} megapixels"


def pixels(images: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """`images` as uint8 N×H×W×C of the model's size, or BadRequest saying what is wrong."""
    try:
        array = np.asarray(images)
    except ValueError:
        raise BadRequest("the arrays are ragged or nested too deeply: every image must be H×W×C "
                         "lists of the same size") from None
    if array.dtype.kind == "S":  # MLflow's CLI hands a binary column's numbers as their text
        array = _numbers(array)
    h, w, c = shape
    want = f"this model takes uint8 images N×{h}×{w}×{c} (integers 0..255)"
    if array.dtype.kind not in "iu":
        kind = {"f": "floating-point", "b": "boolean", "U": "text", "S": "text"}.get(
            array.dtype.kind, "mixed or non-numeric")
        raise BadRequest(f"the arrays hold {kind} values; {want}")
    if array.ndim != 4 or array.shape[1:] != shape:
        raise BadRequest(f"the arrays have shape {'×'.join(map(str, array.shape))}; {want}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise BadRequest(f"pixel values outside 0..255; {want}")
    return array.astype(np.uint8, copy=False)


def _numbers(text: np.ndarray) -> np.ndarray:
    """Numbers' text as integers where each is one, else as floats, else the text as it was."""
    for kind in (np.int64, np.float64):
        try:
            return text.astype(kind)
        except (ValueError, OverflowError):
            pass
    return text


def table(probs: np.ndarray, classes: list[str], top_k: int) -> pd.DataFrame:
    """The output rows of N×classes probabilities."""
    top = np.argsort(-probs, axis=1, kind="stable")[:, :min(top_k, len(classes))]
    rows = [{"class": classes[idx[0]], "confidence": float(p[idx[0]]),
             "top_k": [{"class": classes[j], "probability": float(p[j])} for j in idx],
             "probabilities": p.astype(float).tolist()} for p, idx in zip(probs, top, strict=True)]
    return pd.DataFrame(rows, columns=["class", "confidence", "top_k", "probabilities"])


# --- what register logs --------------------------------------------------------------------------


def signature(classes: list[str]):
    """The image column in; class, confidence, top_k and probabilities out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import Array, Object, Property

    ranked = Object([Property("class", "string"), Property("probability", "double")])
    return ModelSignature(
        inputs=Schema([ColSpec("binary", COLUMN)]),
        outputs=Schema([ColSpec("string", "class"), ColSpec("double", "confidence"),
                        ColSpec(Array(ranked), "top_k"),
                        ColSpec(Array("double"), "probabilities")]),
    )


def png(image: np.ndarray) -> bytes:
    """One uint8 H×W×C image as PNG file bytes."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(out, format="PNG")
    return out.getvalue()


def input_example(images: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({COLUMN: [png(np.asarray(x)) for x in images]})


def model_config(cfg: Predict) -> dict[str, Any]:
    return {k: getattr(cfg, k.removeprefix("predict.")) for k in CONFIG_KEYS}


def metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """What the MLflow UI shows beside the signature: classes and the input the model expects."""
    h, w = meta["image_size"]
    return {"classes": [str(c) for c in meta["classes"]], "image_size": [h, w],
            "channels": meta["channels"], "resize": meta.get("resize"),
            "min_side": meta.get("min_side"), "input": f"column {COLUMN}: base64 "
            f"{', '.join(FORMATS)} file bytes; or uint8 N×{h}×{w}×{meta['channels']} arrays "
            "as {\"inputs\": [...]}"}


def requirements() -> list[str]:
    return [f"{p}=={installed(p)}" for p in REQUIREMENTS]


# --- the scoring server's request handler --------------------------------------------------------


def guard() -> None:
    """Put `handle` in front of the scoring server's request handler, when this process is one
    (it imports mlflow.pyfunc.scoring_server before it loads the model); idempotent."""
    server = sys.modules.get("mlflow.pyfunc.scoring_server")
    if server is None or getattr(server.invocations, "guarded", False):
        return
    original = server.invocations

    def invocations(data, content_type, model, input_schema):
        python_model = _python_model(model)
        if python_model is None:  # another model in this process: MLflow's own handling
            return original(data, content_type, model, input_schema)
        return handle(server, python_model, model, data, content_type)

    invocations.guarded = True
    server.invocations = invocations


def _python_model(model) -> ImageClassifier | None:
    try:
        found = model.unwrap_python_model()
    except Exception:  # not a python_model pyfunc
        return None
    return found if isinstance(found, ImageClassifier) else None


def handle(server, clf: ImageClassifier, model, data: bytes, content_type: str | None):
    """The server's answer to one /invocations request (an InvocationsResponse)."""
    try:
        kind, items = request_items(data, content_type, clf.limits, clf.shape)
        if kind == "arrays":
            rows = clf.classify(items)  # checked there (`pixels`)
        else:  # MLflow's pyfunc predict: its schema check, then ImageClassifier.predict
            rows = model.predict(pd.DataFrame({COLUMN: [_unbase64(i, x)
                                                        for i, x in enumerate(items)]}))
        out = io.StringIO()
        server.predictions_to_json(rows, out)
        return server.InvocationsResponse(out.getvalue(), 200, "application/json")
    except BadRequest as err:
        return _reply(server, err.status, err.message)
    except Exception:
        log.exception("scoring failed")  # the traceback goes to the server's log only
        return _reply(server, 500, "the model failed on this request; the server's log says why")


def _reply(server, status: int, message: str):
    body = json.dumps({"error_code": ERROR_CODES[status], "message": message})
    return server.InvocationsResponse(body, status, "application/json")


def request_items(data: bytes, content_type: str | None, cfg: Predict,
                  shape: tuple[int, int, int]) -> tuple[str, list]:
    """("files", base64 strings) or ("arrays", nested lists) of a request, its size, type, JSON
    and number of images checked; `shape` is the model's H×W×C."""
    if len(data) > cfg.max_request_mb * MB:
        raise BadRequest(f"the request is {len(data) / MB:.1f} MB, over the served model's limit "
                         f"of {cfg.max_request_mb:g} MB (predict.max_request_mb); send fewer or "
                         "smaller images per request", 413)
    if (content_type or "").split(";")[0].strip().lower() != "application/json":
        raise BadRequest(f"send the request as Content-Type: application/json, {EXAMPLE}", 415)
    if not data.strip():
        raise BadRequest(f"the request is empty; send images, {EXAMPLE}")
    _check_json_size(data, cfg.max_batch, shape)
    try:
        body = json.loads(data)
    except json.JSONDecodeError as err:
        raise BadRequest(f"the request is not valid JSON ({err.msg} at line {err.lineno} column "
                         f"{err.colno}); {EXAMPLE}") from None
    except UnicodeDecodeError:
        raise BadRequest("the request is not UTF-8 text; send JSON") from None
    except RecursionError:
        raise BadRequest(f"the request's JSON is nested too deeply; {EXAMPLE}") from None
    except ValueError:  # Python's bound on the digits of an integer literal
        raise BadRequest(f"the request holds an integer of more than "
                         f"{sys.get_int_max_str_digits()} digits; {EXAMPLE}") from None
    kind, items = _items(body)
    if not items:
        raise BadRequest(f"the request holds no images; {EXAMPLE}")
    if len(items) > cfg.max_batch:
        raise BadRequest(f"the request holds {len(items)} images, more than the served model's "
                         f"max_batch of {cfg.max_batch} (predict.max_batch); send at most "
                         f"{cfg.max_batch} per request", 413)
    return kind, items


def _check_json_size(data: bytes, max_batch: int, shape: tuple[int, int, int]) -> None:
    """Refuse, before parsing, JSON with more values than max_batch images need: each becomes a
    Python object (32 MB of `[]` measured 1.2 GB and 9 s to parse). An image takes at most
    1 + H + H×W arrays and H×W×C numbers (as uint8 arrays), or an object and two strings (as a
    file); a quote, bracket or comma inside a string counts too (base64 holds none)."""
    h, w, c = shape
    counts = {"arrays and objects": (data.count(b"[") + data.count(b"{"), 1 + h + h * w),
              "strings": (data.count(b'"') // 2, 2),
              "values": (data.count(b","), h * w * c + h * w + h + 1)}
    for what, (found, per_image) in counts.items():
        most = max_batch * per_image + 64
        if found > most:
            raise BadRequest(f"the request's JSON holds {found:,} {what}, more than the {most:,} "
                             f"that {max_batch} images (predict.max_batch) of this model's "
                             f"{h}×{w}×{c} need: it is nested too deeply or holds too many "
                             f"images; {EXAMPLE}")


def _items(body: Any) -> tuple[str, list]:
    """The images of one of MLflow's JSON forms: base64 strings of column `image`, or arrays."""
    keys = [k for k in JSON_FORMATS if isinstance(body, dict) and k in body]
    if len(keys) != 1:
        raise BadRequest(f"the request must be a JSON object with exactly one of the keys "
                         f"{', '.join(JSON_FORMATS)}; {EXAMPLE}")
    key, value = keys[0], body[keys[0]]
    missing = f"{key} has no column {COLUMN!r}; {EXAMPLE}"
    if key == "dataframe_split":
        columns = value.get("columns") if isinstance(value, dict) else None
        rows = value.get("data") if isinstance(value, dict) else None
        if not isinstance(columns, list) or not isinstance(rows, list):
            raise BadRequest("dataframe_split must be {\"columns\": [...], \"data\": [[...]]}")
        if COLUMN not in columns:
            raise BadRequest(missing)
        at = columns.index(COLUMN)
        return "files", [r[at] if isinstance(r, list) and len(r) > at else None for r in rows]
    if isinstance(value, dict):  # inputs/instances, by column
        if COLUMN not in value:
            raise BadRequest(missing)
        column = value[COLUMN]
        return "files", column if isinstance(column, list) else [column]
    if not isinstance(value, list):
        raise BadRequest(f"{key} must be a list; {EXAMPLE}")
    if key == "dataframe_records" or (value and all(isinstance(r, dict) for r in value)):
        if not all(isinstance(r, dict) and COLUMN in r for r in value):
            raise BadRequest(f"every record of {key} needs the column {COLUMN!r}; {EXAMPLE}")
        return "files", [r[COLUMN] for r in value]
    return "arrays", value


def _unbase64(i: int, item: Any) -> bytes:
    if not isinstance(item, str | bytes):
        raise BadRequest(f"image {i}: expected a base64 string of {', '.join(FORMATS)} file bytes "
                         f"in column {COLUMN!r}, got {_json_type(item)}")
    try:  # MLflow's own examples wrap base64 at 76 characters: line breaks are fine
        return base64.b64decode(item[:0].join(item.split()), validate=True)  # "" or b""
    except (binascii.Error, ValueError) as err:
        raise BadRequest(f"image {i}: not valid base64 ({err})") from None


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
