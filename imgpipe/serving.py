"""The released candidate: the serving bundle, a Triton model repository, and the service
checked over HTTP.

Picks the bundle (``serve.model``: ``best`` is the highest validation macro-F1 among the models
that beat the weighted random guess; test plays no part), copies it to the serving folder, writes
a Triton repository (``<name>/config.pbtxt`` with dynamic batching on the ONNX Runtime backend,
``<name>/1/model.onnx``, ``<name>/labels.txt``), then starts the service (``serve.app``)
in-process and sends it every validation and test image over HTTP. The metrics, per split: HTTP
accuracy (must equal the bundle's offline accuracy), and agreement with ONNX Runtime on the same
pixels; latency and throughput differ on every run, so they go to an untracked timings file.

The images are read, sent and compared READ_BATCH at a time, so memory holds a few batches of
pixels whatever the splits' size; only the probabilities (images x classes) are kept whole. The
throughput counts the time spent answering those batches (not the service's start, nor the
reading and offline comparison between batches).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imgpipe.bundle import BUNDLE_SETTINGS, LABELS, METADATA, MODEL_FILES, SETTINGS, evaluated_metrics
from imgpipe.errors import StageError
from imgpipe.files import write_folder_atomic, write_text_atomic
from imgpipe.params import ServeParams
from imgpipe.training.evaluation import predict_split, side_by_side

if TYPE_CHECKING:
    from serve.bundle import Bundle

CLIENTS = 8  # concurrent HTTP clients in the check: enough for the batcher to form batches
SPLITS = ("val", "test")  # checked over HTTP; train is not (the model has seen it)
# Images read, sent and compared at a time. The memory bound: tf.data holds a few batches as
# float32 (38 MB each at 224 px). Eight times CLIENTS: the clients stay busy but for each batch's
# last requests (no throughput lost to it that runs could tell apart from noise).
READ_BATCH = 64


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


@dataclass
class HttpCheck:
    """A running service, sent a batch of images at a time by CLIENTS concurrent clients, one
    image a request; it keeps each request's latency and the time spent answering."""

    send: Callable[[int, np.ndarray], tuple[list[float], float]]  # (index, pixels) -> (scores by label, seconds)
    pool: ThreadPoolExecutor
    bundle: Bundle  # the service's own loaded bundle
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0  # from each batch's first request to its last answer, summed

    def ask(self, images: np.ndarray) -> np.ndarray:
        """The service's probabilities (in label order) for a batch of uint8 images."""
        first = len(self.latencies)
        started = time.perf_counter()
        answers = list(self.pool.map(self.send, range(first, first + len(images)), images))
        self.seconds += time.perf_counter() - started
        self.latencies.extend(seconds for _, seconds in answers)
        return np.array([scores for scores, _ in answers], dtype=np.float64)


@contextmanager
def check_over_http(bundle_dir: Path, p: ServeParams) -> Iterator[HttpCheck]:
    """A real service on loopback for the block's length, with CLIENTS clients to ask it."""
    import httpx

    from serve.app import create_app
    from serve.running import running
    from serve.settings import resolve

    app = create_app(resolve(bundle_dir, max_queue=max(p.max_queue, CLIENTS)))  # the settings it wrote
    labels = app.state.bundle.labels
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(CLIENTS) as pool:
        def send(index: int, pixels: np.ndarray) -> tuple[list[float], float]:
            started = time.perf_counter()
            response = client.post("/predict", files={"image": (f"image-{index}.png", png(pixels), "image/png")})
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise StageError(f"the service answered image {index} with HTTP "
                                 f"{response.status_code}: {response.text[:200]}")
            scores = response.json()["scores"]
            return [scores[label] for label in labels], elapsed

        yield HttpCheck(send, pool, app.state.bundle)


def offline(bundle: Bundle, images: np.ndarray, batch: int) -> np.ndarray:
    """The bundle's probabilities straight from ONNX Runtime, ``batch`` images a call: the
    service's largest batch, so that ONNX Runtime's working memory stays what serving needs."""
    return np.concatenate([bundle.predict(images[i:i + batch])[0] for i in range(0, len(images), batch)])


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
    over HTTP on ``records``' val and test splits, and write ``reports/metrics.json`` and the timings.
    The check's verdict is ``Served.require_agreement``'s, so the numbers can be shown first."""
    chosen = choose(bundles, p.model)
    metadata = json.loads((chosen / METADATA).read_text())
    labels = json.loads((chosen / LABELS).read_text())

    settings = {name: getattr(p, name) for name in BUNDLE_SETTINGS}  # what `python -m serve` starts with
    write_folder_atomic(out, {**{path.name: path.read_bytes() for path in sorted(chosen.iterdir()) if path.is_file()},
                              SETTINGS: (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode()})
    name = chosen.name  # what serve.model names
    write_folder_atomic(triton, {f"{name}/config.pbtxt": triton_config(name, metadata, labels, p).encode(),
                                 f"{name}/1/model.onnx": (chosen / MODEL_FILES["fp32"]).read_bytes(),
                                 f"{name}/labels.txt": "".join(f"{label}\n" for label in labels).encode()})

    from imgpipe.records.read import DatasetError, image_batches

    try:  # both splits listed and verified before the service starts
        batches = {split: image_batches(records, split, READ_BATCH, metadata["input"]["shape"][1])
                   for split in SPLITS}
    except DatasetError as exc:
        raise StageError(f"--records {records}: {exc}") from None
    checked, http, direct = {}, [], []
    with check_over_http(out, p) as service:
        for split in SPLITS:  # each batch over HTTP, then straight through the service's own bundle
            y_true, found = predict_split(batches[split], {
                "http": service.ask, "direct": lambda images: offline(service.bundle, images, p.max_batch)})
            http.append(found["http"])
            direct.append(found["direct"])
            checked[split] = {"images": len(y_true),
                              "http_accuracy": round(float(np.mean(found["http"].argmax(1) == y_true)), 6),
                              "offline_accuracy": metadata["metrics"][split]["accuracy"]}
    http_probs, direct_probs = np.concatenate(http), np.concatenate(direct)
    latencies = service.latencies
    metrics = {
        "model": name, "version": metadata["version"], "beats_baseline": metadata["metrics"]["beats_baseline"],
        **side_by_side(checked),
        # Batches of other sizes may round the last bits differently: agreement, not equality of bits.
        "agreement_with_onnxruntime": float(np.mean(http_probs.argmax(1) == direct_probs.argmax(1))),
        "max_abs_diff_onnxruntime": float(f"{float(np.max(np.abs(http_probs - direct_probs))):.1e}"),
    }
    write_text_atomic(reports / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    timings = {"images": len(latencies), "clients": CLIENTS, "images_per_second": len(latencies) / service.seconds,
               "p50_ms": 1000 * float(np.percentile(latencies, 50)),
               "p99_ms": 1000 * float(np.percentile(latencies, 99))}
    write_text_atomic(timings_path, json.dumps(timings, indent=2) + "\n")
    return Served(metrics, timings)
