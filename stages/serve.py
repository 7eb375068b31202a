"""Stage 5, the serving bundle, a Triton model repository, and the service checked over HTTP.

    python -m stages.serve --bundles build/onnx --records build/tfrecords --out build/serving \\
        --triton build/triton --reports reports/serve

Picks the bundle (``serve.model``: ``best`` is the higher validation macro-F1), copies it to
``--out``, writes a Triton repository (``<name>/config.pbtxt`` with dynamic batching on the ONNX
Runtime backend, ``<name>/1/model.onnx``, ``labels.txt``), then starts the service in-process
and sends it every validation image over HTTP. DVC metrics: HTTP accuracy (must equal the
bundle's offline accuracy) and agreement with ONNX Runtime on the same pixels. Latency and
throughput go to ``logs/serve.json``: timings differ on every run, so they are not DVC outputs.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from imgpipe import params as params_module
from imgpipe.cli import StageError, run
from imgpipe.files import write_folder_atomic, write_text_atomic

NAME = "serve"
CLIENTS = 8  # concurrent HTTP clients in the check: enough for the batcher to form batches


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m stages.{NAME}", description=__doc__.split("\n")[0])
    parser.add_argument("--bundles", type=Path, required=True, help="folder of exported bundles (one per model)")
    parser.add_argument("--records", type=Path, required=True, help="TFRecords folder (the validation split)")
    parser.add_argument("--out", type=Path, required=True, help="serving bundle folder to write")
    parser.add_argument("--triton", type=Path, required=True, help="Triton model repository to write")
    parser.add_argument("--reports", type=Path, default=Path("reports/serve"), help="metrics.json folder")
    parser.add_argument("--timings", type=Path, default=Path("logs/serve.json"),
                        help="untracked JSON of latency and throughput (default: %(default)s)")
    params_module.add_section_flags(parser, NAME)
    return parser.parse_args(argv)


def choose(bundles: Path, wanted: str) -> Path:
    """The bundle named ``wanted``, or for ``best`` the one with the highest validation macro-F1."""
    found = {}
    for folder in sorted(p for p in bundles.iterdir() if (p / "metadata.json").is_file()):
        found[folder.name] = json.loads((folder / "metadata.json").read_text())
    if not found:
        raise StageError(f"--bundles {bundles}: no exported bundle (run the export stage)")
    if wanted == "best":
        return bundles / max(sorted(found), key=lambda name: found[name]["metrics"]["macro_f1"])
    if wanted not in found:
        raise StageError(f"serve.model: no bundle {wanted!r} in {bundles} (there are: {', '.join(sorted(found))})")
    return bundles / wanted


def triton_config(name: str, metadata: dict, labels: list[str], p) -> str:  # type: ignore[no-untyped-def]
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


def check_over_http(bundle_dir: Path, images: np.ndarray, p):  # type: ignore[no-untyped-def]
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
            response = client.post("/predict", files={"image": (f"val-{index}.png", png(images[index]), "image/png")})
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise StageError(f"the service answered validation image {index} with HTTP "
                                 f"{response.status_code}: {response.text[:200]}")
            scores = response.json()["scores"]
            return [scores[label] for label in labels], elapsed

        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(send, range(len(images))))
    probabilities = np.array([scores for scores, _ in answers], dtype=np.float64)
    return probabilities, [seconds for _, seconds in answers], app.state.bundle


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    p = params_module.load_for(args).serve
    chosen = choose(args.bundles, p.model)
    metadata = json.loads((chosen / "metadata.json").read_text())
    labels = json.loads((chosen / "labels.json").read_text())

    write_folder_atomic(args.out, {path.name: path.read_bytes() for path in sorted(chosen.iterdir()) if path.is_file()})
    name = chosen.name  # what serve.model names
    write_folder_atomic(args.triton, {f"{name}/config.pbtxt": triton_config(name, metadata, labels, p).encode(),
                                 f"{name}/1/model.onnx": (chosen / "model.onnx").read_bytes(),
                                 f"{name}/labels.txt": "".join(f"{label}\n" for label in labels).encode()})

    from imgpipe.records.read import DatasetError, load_arrays

    try:
        images, y_true = load_arrays(args.records, "val", metadata["input"]["shape"][1])
    except DatasetError as exc:
        raise StageError(f"--records {args.records}: {exc}") from None
    started = time.perf_counter()
    http_probs, latencies, bundle = check_over_http(args.out, images, p)
    seconds = time.perf_counter() - started

    direct, _ = bundle.predict(images)
    http_accuracy = float(np.mean(http_probs.argmax(1) == y_true))
    offline = float(metadata["metrics"]["accuracy"])
    metrics = {
        "model": name, "version": metadata["version"], "images": len(images),
        "http_accuracy": http_accuracy, "offline_accuracy": offline,
        # Batches of other sizes may round the last bits differently: agreement, not equality of bits.
        "agreement_with_onnxruntime": float(np.mean(http_probs.argmax(1) == direct.argmax(1))),
        "max_abs_diff_onnxruntime": float(f"{float(np.max(np.abs(http_probs - direct))):.1e}"),
    }
    write_text_atomic(args.reports / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    timings = {"images": len(images), "clients": CLIENTS, "images_per_second": len(images) / seconds,
               "p50_ms": 1000 * float(np.percentile(latencies, 50)),
               "p99_ms": 1000 * float(np.percentile(latencies, 99))}
    write_text_atomic(args.timings, json.dumps(timings, indent=2) + "\n")
    print(f"{NAME}: {name} {metadata['version']}: {len(images)} val images over HTTP, accuracy {http_accuracy:.3f} "
          f"(offline {offline:.3f}), agreement with ONNX Runtime {metrics['agreement_with_onnxruntime']:.3f}; "
          f"{timings['images_per_second']:.0f} images/s, p50 {timings['p50_ms']:.0f} ms, "
          f"p99 {timings['p99_ms']:.0f} ms with {CLIENTS} clients; Triton repository {args.triton}")
    if abs(http_accuracy - offline) > 1e-9 or metrics["agreement_with_onnxruntime"] != 1.0:
        raise StageError(f"the service disagrees with the offline model: HTTP accuracy {http_accuracy:.4f}, "
                         f"offline {offline:.4f}, top-1 agreement {metrics['agreement_with_onnxruntime']:.4f}")


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), NAME)
