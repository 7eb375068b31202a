"""python -m serve --bundle DIR --host 127.0.0.1 --port 8000: the prediction service on uvicorn.

The bundle defaults to model/ (the release, `dvc pull model.dvc`), else build/serving/ (the last
`dvc repro`). Remote URLs and server files are off unless --allow-remote / --path-root say so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imgpipe.bundle import MODEL_FILES, SERVING
from imgpipe.cli import at_least


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=None,
                        help="serving bundle (default: model/, else build/serving/)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=at_least(0), default=8000)
    parser.add_argument("--max-batch", type=at_least(1), default=SERVING.max_batch, help="images per ONNX Runtime call")
    parser.add_argument("--max-wait-ms", type=at_least(0, float), default=SERVING.max_wait_ms,
                        help="how long a batch waits to fill")
    parser.add_argument("--max-queue", type=at_least(1), default=SERVING.max_queue,
                        help="waiting images before 503 + Retry-After")
    parser.add_argument("--max-body-bytes", type=at_least(1), default=SERVING.max_body_bytes,
                        help="larger requests get 413")
    parser.add_argument("--max-pixels", type=at_least(1), default=SERVING.max_pixels, help="larger images get 422")
    parser.add_argument("--threads", type=at_least(0), default=SERVING.threads,
                        help="ONNX Runtime threads per batch (0: one per core)")
    parser.add_argument("--workers", type=at_least(1), default=SERVING.workers,
                        help="batches run at once (default: one per core, %(default)s here)")
    parser.add_argument("--precision", choices=sorted(MODEL_FILES), default=SERVING.precision,
                        help="int8: the bundle's static INT8 variant (export.quantize), faster on most CPUs")
    parser.add_argument("--allow-remote", action="store_true", help='accept {"url": ...} (public addresses only)')
    parser.add_argument("--remote-allow-cidr", action="append", default=[], metavar="CIDR",
                        help="also allow fetching from this range (repeatable), e.g. 10.0.0.0/8")
    parser.add_argument("--remote-timeout", type=at_least(0.001, float), default=10.0, help="seconds per URL fetch")
    parser.add_argument("--path-root", type=Path, default=None, help='accept {"path": ...} for files under DIR')
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from serve.app import Settings
    from serve.bundle import default_bundle
    from serve.remote import RemotePolicy

    bundle = args.bundle or default_bundle()
    remote = RemotePolicy.from_cidrs(args.allow_remote, args.remote_allow_cidr, max_bytes=args.max_body_bytes,
                                     timeout=args.remote_timeout)
    if args.path_root is not None and not args.path_root.is_dir():
        raise ValueError(f"--path-root {args.path_root}: not a folder")
    return Settings(bundle=bundle, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                    max_body_bytes=args.max_body_bytes, max_pixels=args.max_pixels, remote=remote,
                    path_root=args.path_root, threads=args.threads, workers=args.workers,
                    precision=args.precision)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import uvicorn

    from serve.app import create_app
    from serve.bundle import BundleError

    try:
        app = create_app(settings_from(args))
    except (BundleError, ValueError) as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
