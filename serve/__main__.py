"""python -m serve --bundle DIR --host 127.0.0.1 --port 8000: the prediction service on uvicorn.

The bundle defaults to model/ (the release, `dvc pull model.dvc`), else build/serving/ (the last
`dvc repro`). Settings: the defaults, then the bundle's settings.json (what the serve stage
checked), then these flags. Remote URLs and server files are off unless --allow-remote /
--path-root say so. SIGTERM drains (readiness fails, accepted requests are answered, at most
--drain-seconds); SIGHUP loads the bundle again and switches to it once it is ready.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imgpipe.bundle import MODEL_FILES, SERVING
from imgpipe.cli import at_least

FROM_BUNDLE = "(default: the bundle's settings.json, else %s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=None,
                        help="serving bundle (default: model/, else build/serving/)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=at_least(0), default=8000, help="TCP port; 0 = any free one (default: "
                        "%(default)s)")
    parser.add_argument("--max-batch", type=at_least(1), help="images per ONNX Runtime call "
                        + FROM_BUNDLE % SERVING.max_batch)
    parser.add_argument("--max-wait-ms", type=at_least(0, float), help="how long a batch waits to fill "
                        + FROM_BUNDLE % SERVING.max_wait_ms)
    parser.add_argument("--max-queue", type=at_least(1), help="waiting images before 503 + Retry-After "
                        + FROM_BUNDLE % SERVING.max_queue)
    parser.add_argument("--max-body-bytes", type=at_least(1), help="larger requests get 413 "
                        + FROM_BUNDLE % SERVING.max_body_bytes)
    parser.add_argument("--max-pixels", type=at_least(1), help="larger images get 422 "
                        + FROM_BUNDLE % SERVING.max_pixels)
    parser.add_argument("--threads", type=at_least(0), help="ONNX Runtime threads per batch (0: one per core; "
                        f"default {SERVING.threads})")
    parser.add_argument("--workers", type=at_least(1), help="batches run at once (default: one per core)")
    parser.add_argument("--precision", choices=sorted(MODEL_FILES),
                        help="int8: the bundle's static INT8 variant (export.quantize), faster on most CPUs "
                             f"(default {SERVING.precision})")
    parser.add_argument("--allow-remote", action="store_true", help='accept {"url": ...} (public addresses only)')
    parser.add_argument("--remote-allow-cidr", action="append", default=[], metavar="CIDR",
                        help="also allow fetching from this range (repeatable), e.g. 10.0.0.0/8")
    parser.add_argument("--remote-timeout", type=at_least(0.001, float),
                        help=f"seconds for a whole URL fetch, however slowly the server sends (default "
                             f"{SERVING.remote_timeout:g})")
    parser.add_argument("--upload-timeout", type=at_least(0.001, float),
                        help=f"seconds a client has to send its request body (default {SERVING.upload_timeout:g})")
    parser.add_argument("--path-root", type=Path, default=None, help='accept {"path": ...} for files under DIR')
    parser.add_argument("--api-key-file", type=Path, default=None, metavar="PATH",
                        help="require 'Authorization: Bearer <key>' with one of the keys in PATH (one per line, "
                             "read at start and on reload) on every route but /healthz, /readyz and the page")
    parser.add_argument("--drain-seconds", type=at_least(0, float), default=SERVING.drain_seconds,
                        help="on SIGTERM, how long accepted requests may take to be answered "
                             "(default: %(default)g)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="least severe JSON log line written (request lines are info; at debug, uvicorn's own "
                             "lines too) (default: %(default)s)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def settings_from(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The settings in force: read again on every reload (the bundle's settings.json, the key file)."""
    from serve.bundle import default_bundle
    from serve.remote import RemotePolicy
    from serve.settings import resolve

    remote = RemotePolicy.from_cidrs(args.allow_remote, args.remote_allow_cidr)
    return resolve(args.bundle or default_bundle(), remote=remote, remote_timeout=args.remote_timeout,
                   api_key_file=args.api_key_file, path_root=args.path_root, max_batch=args.max_batch,
                   max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                   max_pixels=args.max_pixels, threads=args.threads, workers=args.workers,
                   precision=args.precision, upload_timeout=args.upload_timeout)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import uvicorn

    from serve import access_log
    from serve.app import create_app
    from serve.bundle import BundleError

    access_log.configure(args.log_level)
    try:
        service = create_app(settings_from(args), resolve=lambda: settings_from(args), reload_on_sighup=True)
    except (BundleError, ValueError) as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 2

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # type: ignore[no-untyped-def]
            service.drain()  # readiness fails before uvicorn stops accepting
            super().handle_exit(sig, frame)

    # uvicorn's own access log is off: serve.access_log writes one JSON line per request instead.
    # Its start and stop lines are left out too, unless asked for: the service logs its own events.
    uvicorn_level = "warning" if args.log_level == "info" else args.log_level
    config = uvicorn.Config(service, host=args.host, port=args.port, log_level=uvicorn_level, access_log=False,
                            timeout_graceful_shutdown=args.drain_seconds)
    bundle = service.state.bundle
    access_log.log_event("starting", model=bundle.name, model_version=bundle.version,
                         url=f"http://{args.host}:{args.port}/")
    Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
