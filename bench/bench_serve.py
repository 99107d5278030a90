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
3. The worst case per request under the shipped limits (params.yaml's predict section: the model
   is registered with them): the largest requests those limits allow, in the formats that cost
   most to decode per pixel (16-bit PNG, lossless WebP, progressive JPEG), one image at
   max_image_mp, max_batch images sharing max_request_mp, and a body at max_request_mb; each sent
   `--repeats` times to `mlflow models serve`. Figures: the median and slowest answer, and the
   server's peak memory during the request (VmHWM, reset before each) over the idle server's
   (VmRSS after one small request; memory the server kept from an earlier row counts), beside
   the targets (2 s, 1 GiB) as ratios. Then the issue's 9400×9400 16-bit PNG, refused from its
   header. Reference: one 8×8 PNG in the same server.

`--sections` picks among throughput, onnx and worst (all three by default).

`--threads N` gives every side N intra-op threads (torch.set_num_threads here, OMP_NUM_THREADS
for the server, ONNX Runtime's intra_op_num_threads); 0 leaves each its default (one per core).
On a machine whose cores are busy with other work, threads that wait for each other dominate
small models' times: 1 measures the model, not the machine's load.

    .venv/bin/python bench/bench_serve.py [--source digits] [--epochs 3] [--seconds 10]
        [--threads 1] [--sections throughput onnx worst] [--repeats 5]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.augment import augment  # noqa: E402
from components.core import outputs  # noqa: E402
from components.core.params import validate  # noqa: E402
from components.data.dataset import load_split  # noqa: E402
from components.evaluate import evaluate  # noqa: E402
from components.export import export  # noqa: E402
from components.prepare import prepare  # noqa: E402
from components.register import register  # noqa: E402
from components.serving.onnx_model import OnnxClassifier  # noqa: E402
from components.serving.pyfunc import png  # noqa: E402
from components.tracking.run import tracked  # noqa: E402
from components.train import train  # noqa: E402
from components.training.checkpoint import Classifier, load_model  # noqa: E402
from tests.support.formats import png_blank  # noqa: E402
from tests.support.servers import model_server  # noqa: E402

MNIST = ROOT.parent / "shared/datasets/mnist"


def pipeline(root: Path, source: str, epochs: int):
    data = {"source": source} | ({"root": str(MNIST), "download": False}
                                 if source == "mnist" else {})
    params = validate({"paths": {k: str(root / k) for k in (
        "prepared", "augment", "train", "evaluate", "register", "predictions", "export")},
        "data": data, "train": {"epochs": epochs, "device": "cpu"},
        "evaluate": {"device": "cpu"}, "register": {"model_name": f"bench-{source}"}})
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


def post(url: str, body: bytes, status: int = 200) -> None:
    request = urllib.request.Request(f"{url}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            got, text = reply.status, reply.read()
    except urllib.error.HTTPError as err:
        got, text = err.code, err.read()
    assert got == status, f"{got}: {text[:300]}"


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


def files_body(blobs: list[bytes]) -> bytes:
    return json.dumps({"inputs": {"image": [base64.b64encode(b).decode() for b in blobs]}}
                      ).encode()


def encoded(image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def largest_requests(cfg) -> dict[str, tuple[list[bytes] | bytes, int]]:
    """The largest requests `cfg` (the predict settings) allows, by name: image files (or a
    whole body) and the status expected. An image at max_image_mp is 3:2, as a camera's."""
    from PIL import Image

    w = int((cfg.max_image_mp * 1e6 * 1.5) ** 0.5)
    h = int(cfg.max_image_mp * 1e6 // w)
    rng = np.random.default_rng(0)
    gradient = np.add.outer(np.arange(h) % 256, np.arange(w) % 256).astype(np.uint8)
    rgba = np.dstack([gradient, gradient[::-1], gradient[:, ::-1], np.full_like(gradient, 200)])
    n = cfg.max_batch
    side = int((cfg.max_request_mp * 1e6 / n) ** 0.5)
    noise_px = int(cfg.max_request_mb * 1e6 * 3 / 4 * 0.98 / 2)  # 16-bit noise fills the body
    noise_side = min(int(noise_px ** 0.5), int((cfg.max_image_mp * 1e6) ** 0.5))
    noise = rng.integers(0, 65536, (noise_side, noise_side), dtype=np.uint16)
    fill = int(cfg.max_request_mb * 1e6) - 32  # bytes of JSON within max_request_mb
    return {
        f"16-bit PNG {w}x{h}": ([png_blank(w, h, 16)], 200),
        f"lossless WebP RGBA {w}x{h}": (
            [encoded(Image.fromarray(rgba), "WEBP", lossless=True, method=0)], 200),
        f"progressive JPEG {w}x{h}": (
            [encoded(Image.fromarray(rgba[..., :3]), "JPEG", progressive=True, quality=95)], 200),
        f"{n} x 16-bit PNG {side}x{side}": ([png_blank(side, side, 16)] * n, 200),
        f"16-bit noise PNG {noise_side}x{noise_side} (body at max_request_mb)": (
            [encoded(Image.fromarray(noise), "PNG", compress_level=1)], 200),
        "the issue's 16-bit PNG 9400x9400 (refused)": ([png_blank(9400, 9400, 16)], 413),
        "JSON of empty arrays at max_request_mb (refused)": (
            b'{"inputs": [' + b",".join([b"[]"] * (fill // 3)) + b"]}", 400),
        "JSON of short strings at max_request_mb (refused)": (
            b'{"inputs": {"image": [' + b",".join([b'"ab"'] * (fill // 5)) + b"]}}", 400),
    }


def server_pid(url: str) -> int:
    """The scoring server's process (uvicorn, which loads the model) listening at `url`."""
    port = url.rsplit(":", 1)[1]
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"uvicorn" in c for c in cmd) and port.encode() in cmd and proc.name.isdigit():
            return int(proc.name)
    raise RuntimeError(f"no uvicorn process for {url}")


def memory_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def worst_case(params, x: np.ndarray, root: Path, threads: int, repeats: int) -> list[dict]:
    uri = f"models:/{params.register.model_name}@champion"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    requests = {"reference: one 8x8 PNG": ([png(x[0])], 200)} | largest_requests(params.predict)
    rows = []
    with model_server(uri, root / "worst", env) as url:
        pid = server_pid(url)
        post(url, files_body([png(x[0])]))  # warm: the first request loads what scoring needs
        idle = memory_kb(pid, "VmRSS")
        for name, (blobs, status) in requests.items():
            body = blobs if isinstance(blobs, bytes) else files_body(blobs)
            blobs = [] if isinstance(blobs, bytes) else blobs
            times, peaks = [], []
            for _ in range(repeats):
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS now
                start = time.perf_counter()
                post(url, body, status)
                times.append(time.perf_counter() - start)
                peaks.append(memory_kb(pid, "VmHWM") - idle)
            rows.append({"request": name, "images": len(blobs), "status": status,
                         "megapixels": sum(_megapixels(b) for b in blobs),
                         "body_mb": len(body) / 1e6, "median_s": float(np.median(times)),
                         "max_s": max(times), "peak_mib": max(peaks) / 1024})
    return rows


def _megapixels(blob: bytes) -> float:
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as img:
        return img.width * img.height / 1e6


def onnx_vs_torch(params, x: np.ndarray, seconds: float, threads: int) -> list[dict]:
    net, meta = load_model(Path(params.paths.train) / outputs.MODEL)
    model = Classifier(net, meta)
    onnx = OnnxClassifier(Path(params.paths.export) / outputs.ONNX, threads=threads)
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
    parser.add_argument("--sections", nargs="+", default=["throughput", "onnx", "worst"],
                        choices=["throughput", "onnx", "worst"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        os.chdir(root)  # the embedded store's artifacts go beside it
        params = pipeline(root, args.source, args.epochs)
        x = np.asarray(load_split(params.paths.prepared, "test").x)
        exported = json.loads((Path(params.paths.export) / outputs.EXPORT).read_text())
        print(f"source {args.source}: {x.shape[1]}x{x.shape[2]}x{x.shape[3]} images, model "
              f"{params.model.name}, {os.cpu_count()} CPUs, threads "
              f"{args.threads or 'default'} (torch {torch.get_num_threads()}), load average "
              f"{os.getloadavg()[0]:.1f}; parity max |dp| {exported['max_abs_diff']:.2g}, "
              f"top-1 agreement {exported['top1_agreement']:.4f}")
        if "throughput" in args.sections:
            print_table("served (mlflow models serve, one client, base64 PNGs) vs in-process "
                        "pyfunc:", ["batch", "served req/s", "served images/s",
                                    "in-process req/s", "served / in-process"],
                        [[r["batch"], f"{r['served_req_s']:.1f}", f"{r['served_img_s']:.0f}",
                          f"{r['in_process_req_s']:.1f}", f"{r['ratio']:.2f}"]
                         for r in serving(params, x, args.seconds, root, args.threads)])
        if "onnx" in args.sections:
            print_table("ONNX Runtime vs PyTorch on the CPU (uint8 batches in, probabilities "
                        "out):", ["batch", "ONNX Runtime images/s", "PyTorch images/s",
                                  "ONNX / PyTorch"],
                        [[r["batch"], f"{r['onnxruntime_img_s']:.0f}",
                          f"{r['pytorch_img_s']:.0f}", f"{r['ratio']:.2f}"]
                         for r in onnx_vs_torch(params, x, args.seconds, args.threads)])
        if "worst" in args.sections:
            cfg = params.predict
            print_table(
                f"worst case per request (max_image_mp {cfg.max_image_mp:g}, max_request_mp "
                f"{cfg.max_request_mp:g}, max_batch {cfg.max_batch}, max_request_mb "
                f"{cfg.max_request_mb:g}), {args.repeats} times each; the highest peak over the "
                "idle server:",
                ["request", "images", "megapixels", "body MB", "status", "median s", "max s",
                 "median / 2 s", "peak MiB over idle", "peak / 1 GiB"],
                [[r["request"], r["images"], f"{r['megapixels']:.1f}", f"{r['body_mb']:.1f}",
                  r["status"], f"{r['median_s']:.2f}", f"{r['max_s']:.2f}",
                  f"{r['median_s'] / 2:.2f}", f"{r['peak_mib']:.0f}",
                  f"{r['peak_mib'] / 1024:.2f}"]
                 for r in worst_case(params, x, root, args.threads, args.repeats)])


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    for row in [columns, ["---"] * len(columns), *rows]:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


if __name__ == "__main__":
    main()
