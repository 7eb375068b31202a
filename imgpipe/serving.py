"""The released candidate: the serving bundle, a Triton model repository, and the service
checked over HTTP.

Picks the bundle (``serve.model``: ``best`` is the highest validation macro-F1 among the models
that beat the weighted random guess; test plays no part), copies it to the serving folder, writes
a Triton repository (``<name>/config.pbtxt`` with dynamic batching on the ONNX Runtime backend,
``<name>/1/model.onnx``, ``<name>/labels.txt``), then starts the service (``serve.app``)
in-process and sends it every validation and test image over HTTP. The metrics, per split: HTTP
accuracy (must equal the bundle's offline accuracy), and agreement with ONNX Runtime on the same
pixels; latency and throughput differ on every run, so they go to an untracked timings file.
"""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgpipe.bundle import LABELS, METADATA, MODEL_FILES, evaluated_metrics
from imgpipe.errors import StageError
from imgpipe.files import write_folder_atomic, write_text_atomic
from imgpipe.params import ServeParams
from imgpipe.training.evaluation import side_by_side

CLIENTS = 8  # concurrent HTTP clients in the check: enough for the batcher to form batches
SPLITS = ("val", "test")  # checked over HTTP; train is not (the model has seen it)


def choose(bundles: Path, wanted: str) -> Path:
    """The bundle named ``wanted``, or for ``best`` the one with the highest validation macro-F1
    among those that beat the weighted random guess (none: a StageError saying so). A model
    named explicitly is served even below the baseline: someone asked for it by name."""
    found = {}
    for folder in sorted(p for p in bundles.iterdir() if (p / METADATA).is_file()):
        found[folder.name] = evaluated_metrics(folder, json.loads((folder / METADATA).read_text()))
    if not found:
        raise StageError(f"--bundles {bundles}: no exported bundle (run the export stage)")
    if wanted == "best":
        learned = [name for name in sorted(found) if found[name]["beats_baseline"]]
        if not learned:
            margin = next(iter(found.values()))["baseline_margin"]
            scores = ", ".join(f"{name} {m['val']['macro_f1']:.3f} (guess {m['val']['baseline_macro_f1']:.3f})"
                               for name, m in sorted(found.items()))
            raise StageError(f"no model beats the weighted random guess by {margin} val macro-F1 ({scores}): "
                             "nothing to serve; see reports/train_*/metrics.json and reports/train_*/pictures/")
        return bundles / max(learned, key=lambda name: found[name]["val"]["macro_f1"])
    if wanted not in found:
        raise StageError(f"serve.model: no bundle {wanted!r} in {bundles} (there are: {', '.join(sorted(found))})")
    return bundles / wanted


def triton_config(name: str, metadata: dict, labels: list[str], p: ServeParams) -> str:
    """config.pbtxt text, built with Triton's own protobuf schema (tritonclient's model_config)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    size = metadata["input"]["shape"][1]
    config = mc.ModelConfig(name=name, backend="onnxruntime", max_batch_size=p.max_batch)
    config.input.add(name="image", data_type=mc.TYPE_FP32, dims=[size, size, 3])
    config.output.add(name="probabilities", data_type=mc.TYPE_FP32, dims=[len(labels)], label_filename="labels.txt")
    if "features" in metadata["outputs"]:
        config.output.add(name="features", data_type=mc.TYPE_FP32, dims=metadata["outputs"]["features"][1:])
    preferred = [n for n in (4, 8, 16, 32, 64) if n < p.max_batch] + [p.max_batch]
    config.dynamic_batching.preferred_batch_size.extend(preferred)
    config.dynamic_batching.max_queue_delay_microseconds = p.triton_max_queue_delay_us
    config.instance_group.add(count=p.triton_instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    return text_format.MessageToString(config)


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def check_over_http(bundle_dir: Path, images: np.ndarray, p: ServeParams):  # type: ignore[no-untyped-def]
    """Every image through a real service on loopback: (probabilities in label order, latencies,
    the service's own loaded bundle)."""
    import httpx

    from serve.app import Settings, create_app
    from serve.running import running

    app = create_app(Settings(bundle=bundle_dir, max_batch=p.max_batch, max_wait_ms=p.max_wait_ms,
                              max_queue=max(p.max_queue, CLIENTS)))
    labels = app.state.bundle.labels
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        def send(index: int) -> tuple[list[float], float]:
            started = time.perf_counter()
            response = client.post("/predict", files={"image": (f"image-{index}.png", png(images[index]), "image/png")})
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise StageError(f"the service answered image {index} with HTTP "
                                 f"{response.status_code}: {response.text[:200]}")
            scores = response.json()["scores"]
            return [scores[label] for label in labels], elapsed

        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(send, range(len(images))))
    probabilities = np.array([scores for scores, _ in answers], dtype=np.float64)
    return probabilities, [seconds for _, seconds in answers], app.state.bundle


@dataclass(frozen=True)
class Served:
    metrics: dict  # as written to the reports' metrics.json
    timings: dict  # as written to the untracked timings JSON

    def require_agreement(self) -> None:
        """Refuse a service that disagrees with the offline model."""
        agreement = self.metrics["agreement_with_onnxruntime"]
        for split in SPLITS:
            http_accuracy, offline = self.metrics["http_accuracy"][split], self.metrics["offline_accuracy"][split]
            if abs(http_accuracy - offline) > 1e-6 or agreement != 1.0:
                raise StageError(f"the service disagrees with the offline model on {split}: HTTP accuracy "
                                 f"{http_accuracy:.4f}, offline {offline:.4f}, top-1 agreement {agreement:.4f}")


def build_serving(bundles: Path, records: Path, out: Path, triton: Path, reports: Path, timings_path: Path,
                  p: ServeParams) -> Served:
    """Copy the chosen bundle to ``out``, write the Triton repository ``triton``, check the service
    over HTTP on ``records``' validation split, and write ``reports/metrics.json`` and the timings.
    The check's verdict is ``Served.require_agreement``'s, so the numbers can be shown first."""
    chosen = choose(bundles, p.model)
    metadata = json.loads((chosen / METADATA).read_text())
    labels = json.loads((chosen / LABELS).read_text())

    write_folder_atomic(out, {path.name: path.read_bytes() for path in sorted(chosen.iterdir()) if path.is_file()})
    name = chosen.name  # what serve.model names
    write_folder_atomic(triton, {f"{name}/config.pbtxt": triton_config(name, metadata, labels, p).encode(),
                                 f"{name}/1/model.onnx": (chosen / MODEL_FILES["fp32"]).read_bytes(),
                                 f"{name}/labels.txt": "".join(f"{label}\n" for label in labels).encode()})

    from imgpipe.records.read import DatasetError, load_arrays

    try:
        arrays = {split: load_arrays(records, split, metadata["input"]["shape"][1]) for split in SPLITS}
    except DatasetError as exc:
        raise StageError(f"--records {records}: {exc}") from None
    images = np.concatenate([arrays[split][0] for split in SPLITS])
    started = time.perf_counter()
    http_probs, latencies, bundle = check_over_http(out, images, p)
    seconds = time.perf_counter() - started

    direct, _ = bundle.predict(images)
    checked, start = {}, 0
    for split in SPLITS:
        y_true = arrays[split][1]
        predicted = http_probs[start:start + len(y_true)].argmax(1)
        start += len(y_true)
        checked[split] = {"images": len(y_true), "http_accuracy": round(float(np.mean(predicted == y_true)), 6),
                          "offline_accuracy": metadata["metrics"][split]["accuracy"]}
    metrics = {
        "model": name, "version": metadata["version"], "beats_baseline": metadata["metrics"]["beats_baseline"],
        **side_by_side(checked),
        # Batches of other sizes may round the last bits differently: agreement, not equality of bits.
        "agreement_with_onnxruntime": float(np.mean(http_probs.argmax(1) == direct.argmax(1))),
        "max_abs_diff_onnxruntime": float(f"{float(np.max(np.abs(http_probs - direct))):.1e}"),
    }
    write_text_atomic(reports / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    timings = {"images": len(images), "clients": CLIENTS, "images_per_second": len(images) / seconds,
               "p50_ms": 1000 * float(np.percentile(latencies, 50)),
               "p99_ms": 1000 * float(np.percentile(latencies, 99))}
    write_text_atomic(timings_path, json.dumps(timings, indent=2) + "\n")
    return Served(metrics, timings)
