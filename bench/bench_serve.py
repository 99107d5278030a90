"""The served model's throughput, and ONNX Runtime against PyTorch on the CPU for the same model.

Runs the pipeline once in a temporary folder (digits by default; `--source mnist` reads
../shared/datasets/mnist): prepare, augment, train (`--epochs`), evaluate, register into an
embedded MLflow store, export to ONNX. Then:

1. `mlflow models serve` of the champion (--env-manager local, on loopback): one client sends
   requests of 1 and of 64 test images as base64 PNG files (`{"inputs": {"image": [...]}}`)
   back to back for `--seconds` each. Reference: the same pyfunc called in this process on the
   same decoded DataFrame (no HTTP, no JSON); the ratio is served / in-process requests per second.
2. The exported model.onnx with ONNX Runtime against the registered model.pt with PyTorch (fp32,
   both on the CPU), scoring uint8 batches of 1 and of 256 test images for `--seconds` each,
   alternating the two; images/s and the ratio ONNX / PyTorch.

`--threads N` gives every side N intra-op threads (torch.set_num_threads here, OMP_NUM_THREADS
for the server, ONNX Runtime's intra_op_num_threads); 0 leaves each its default (one per core).
On a machine whose cores are busy with other work, threads that wait for each other dominate
small models' times: 1 measures the model, not the machine's load.

    .venv/bin/python bench/bench_serve.py [--source digits] [--epochs 3] [--seconds 10]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components import files  # noqa: E402
from components.augment import augment  # noqa: E402
from components.checkpoint import Classifier, load_model  # noqa: E402
from components.evaluate import evaluate  # noqa: E402
from components.export import export  # noqa: E402
from components.onnx_model import OnnxClassifier  # noqa: E402
from components.params import validate  # noqa: E402
from components.prepare import prepare  # noqa: E402
from components.prepared import load_split  # noqa: E402
from components.register import register  # noqa: E402
from components.serve import png  # noqa: E402
from components.tracking import tracked  # noqa: E402
from components.train import train  # noqa: E402
from tests.servers import model_server  # noqa: E402

MNIST = ROOT.parent / "shared/datasets/mnist"


def pipeline(root: Path, source: str, epochs: int):
    data = {"source": source} | ({"root": str(MNIST), "download": False}
                                 if source == "mnist" else {})
    params = validate({"paths": {k: str(root / k) for k in (
        "prepared", "augment", "train", "evaluate", "register", "predictions", "export")},
        "data": data, "train": {"epochs": epochs, "device": "cpu"},
        "evaluate": {"device": "cpu"}, "register": {"model_name": f"bench-{source}"},
        "predict": {"max_batch": 64}})
    prepare(params)
    augment(params)
    tracked(train, "start")(params)
    tracked(evaluate)(params)
    tracked(register)(params)
    tracked(export)(params)
    return params


def rate(call, seconds: float) -> tuple[float, int]:
    """Calls per second of `call()` over about `seconds` (after one warm-up call)."""
    call()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        call()
        n += 1
    return n / (time.perf_counter() - start), n


def post(url: str, body: bytes) -> None:
    request = urllib.request.Request(f"{url}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        assert reply.status == 200
        reply.read()


def serving(params, x: np.ndarray, seconds: float, root: Path, threads: int) -> list[dict]:
    import mlflow
    import pandas as pd

    uri = f"models:/{params.register.model_name}@champion"
    model = mlflow.pyfunc.load_model(uri)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    rows = []
    with model_server(uri, root / "served", env) as url:
        for batch in (1, 64):
            blobs = [png(x[i % len(x)]) for i in range(batch)]
            body = json.dumps({"inputs": {"image": [base64.b64encode(b).decode()
                                                    for b in blobs]}}).encode()
            frame = pd.DataFrame({"image": blobs})
            served, local = [], []
            for _ in range(2):  # alternated: a change in the machine's load hits both
                served.append(rate(lambda body=body: post(url, body), seconds / 2)[0])
                local.append(rate(lambda frame=frame: model.predict(frame), seconds / 2)[0])
            served_s, local_s = float(np.mean(served)), float(np.mean(local))
            rows.append({"batch": batch, "served_req_s": served_s,
                         "served_img_s": served_s * batch, "in_process_req_s": local_s,
                         "ratio": served_s / local_s})
    return rows


def onnx_vs_torch(params, x: np.ndarray, seconds: float, threads: int) -> list[dict]:
    net, meta = load_model(Path(params.paths.train) / files.MODEL)
    model = Classifier(net, meta)
    onnx = OnnxClassifier(Path(params.paths.export) / files.ONNX, threads=threads)
    rows = []
    for batch in (1, 256):
        images = np.ascontiguousarray(x[np.arange(batch) % len(x)])
        tensor = torch.from_numpy(images)

        def torch_call(tensor=tensor):
            with torch.inference_mode():
                model(tensor)

        ort, pt = [], []
        for _ in range(2):  # alternated: a change in the machine's load hits both
            ort.append(rate(lambda images=images: onnx.probabilities(images), seconds / 2)[0])
            pt.append(rate(torch_call, seconds / 2)[0])
        ort_s, pt_s = batch * float(np.mean(ort)), batch * float(np.mean(pt))
        rows.append({"batch": batch, "onnxruntime_img_s": ort_s, "pytorch_img_s": pt_s,
                     "ratio": ort_s / pt_s})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="digits", choices=["digits", "mnist"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        os.chdir(root)  # the embedded store's artifacts go beside it
        params = pipeline(root, args.source, args.epochs)
        x = np.asarray(load_split(params.paths.prepared, "test").x)
        exported = json.loads((Path(params.paths.export) / files.EXPORT).read_text())
        print(f"source {args.source}: {x.shape[1]}x{x.shape[2]}x{x.shape[3]} images, model "
              f"{params.model.name}, {os.cpu_count()} CPUs, threads "
              f"{args.threads or 'default'} (torch {torch.get_num_threads()}), load average "
              f"{os.getloadavg()[0]:.1f}; parity max |dp| {exported['max_abs_diff']:.2g}, "
              f"top-1 agreement {exported['top1_agreement']:.4f}")
        print("\nserved (mlflow models serve, one client, base64 PNGs) vs in-process pyfunc:")
        print("| batch | served req/s | served images/s | in-process req/s | served / in-process |")
        print("| --- | --- | --- | --- | --- |")
        for r in serving(params, x, args.seconds, root, args.threads):
            print(f"| {r['batch']} | {r['served_req_s']:.1f} | {r['served_img_s']:.0f} | "
                  f"{r['in_process_req_s']:.1f} | {r['ratio']:.2f} |")
        print("\nONNX Runtime vs PyTorch on the CPU (uint8 batches in, probabilities out):")
        print("| batch | ONNX Runtime images/s | PyTorch images/s | ONNX / PyTorch |")
        print("| --- | --- | --- | --- |")
        for r in onnx_vs_torch(params, x, args.seconds, args.threads):
            print(f"| {r['batch']} | {r['onnxruntime_img_s']:.0f} | {r['pytorch_img_s']:.0f} | "
                  f"{r['ratio']:.2f} |")


if __name__ == "__main__":
    main()
