"""The prediction service: FastAPI on ONNX Runtime, dynamic batching, errors as data. No TensorFlow.

    app = create_app(Settings(bundle=Path("model")))    # an ASGI app (serve.service.Service)

Every refusal is ``{"error": {"code", "message"}}`` with a 4xx status (503 with Retry-After when
the queue is full); bad input never produces a 500 or a traceback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from imgpipe.bundle import METADATA
from serve.access_log import AccessLog, note_batch
from serve.annotate import annotate as draw_annotation
from serve.attention import METHOD_HEADER, Method, attention_map, method_of
from serve.auth import KeyCheck
from serve.batcher import Batcher, QueueFull
from serve.bundle import Bundle, BundleError
from serve.errors import ApiError
from serve.inputs import (
    JSON,
    MULTIPART,
    PredictJson,
    bytes_from_json,
    content_type,
    decode,
    parse_json,
    read_form,
    unsupported,
    upload_bytes,
)
from serve.metrics import Metrics
from serve.middleware import BodyLimit, Timing
from serve.page import PUBLIC_PATHS, PUBLIC_PREFIXES, add_page
from serve.service import ReloadError, Service
from serve.settings import Settings

__all__ = ["Settings", "create_app"]
PROBES = ("/healthz", "/readyz")  # answered without a key: load balancers and orchestrators ask them


# --- response models (also the OpenAPI schema schemathesis checks the service against) ---------


class ErrorBody(BaseModel):
    code: str = Field(description="stable machine-readable reason, e.g. not_an_image")
    message: str = Field(description="what is wrong, naming the field or input")


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelInfo(BaseModel):
    name: str
    version: str


class Prediction(BaseModel):
    label: str = Field(description="most likely label")
    confidence: float = Field(description="its probability")
    scores: dict[str, float] = Field(description="probability per label (the top_k most likely when top_k is given)")
    model: ModelInfo


class BatchResponse(BaseModel):
    results: list[Prediction | ErrorResponse] = Field(description="one per image, in the order sent")


class SplitMetrics(BaseModel):
    accuracy: float = Field(description="top-1 accuracy of the exported fp32 ONNX model on this split")
    macro_f1: float = Field(description="F1 averaged over the labels, each label counting the same")
    baseline_macro_f1: float = Field(description="expected macro-F1 of the weighted random guess (each label "
                                                 "guessed as often as it occurs in this split)")


class ModelMetrics(BaseModel):
    val: SplitMetrics = Field(description="validation split: it chose the best epoch, trial and served model")
    test: SplitMetrics = Field(description="held-out test split: played no part in any choice, measured once")
    beats_baseline: bool = Field(description="whether val macro-F1 is at least baseline_margin above the weighted "
                                             "random guess's (`serve.model: best` serves only such a model)")
    baseline_margin: float = Field(description="the margin beats_baseline asks for, in macro-F1")


class ServiceSettings(BaseModel):
    max_batch: int = Field(description="images per ONNX Runtime call")
    max_wait_ms: float = Field(description="how long the first image of a batch waits for company")
    max_queue: int = Field(description="images waiting before 503 + Retry-After")
    max_body_bytes: int
    max_pixels: int
    max_batch_images: int
    threads: int
    workers: int
    precision: str
    upload_timeout: float = Field(description="seconds a client has to send its request body")
    remote_urls: bool
    remote_timeout: float = Field(description="seconds for a whole URL fetch")
    paths: bool = Field(description='whether {"path": ...} inputs are read (--path-root)')
    keys_required: bool = Field(description="whether requests need Authorization: Bearer <key>")


class Metadata(BaseModel):
    name: str
    version: str
    labels: list[str] = Field(description="labels in output index order")
    input_size: int = Field(description="side of the square the image is letterboxed into")
    metrics: ModelMetrics | None = Field(description="the exported model's metrics, on val and on the held-out test "
                                              "split separately; null for a bundle that was never evaluated")
    dataset: str = Field(description="hash of the TFRecords the model was trained on")
    class_activation_maps: bool = Field(description="whether the model's head allows class-activation maps")
    attention: Method = Field(description="how /annotate finds what the model looked at: the class "
                                          "activation map when the head allows it, else occlusion")
    precision: str = Field(description="fp32 (model.onnx) or int8 (model.int8.onnx)")
    allow_remote: bool = Field(description='whether {"url": ...} inputs are fetched (--allow-remote)')
    settings: ServiceSettings = Field(description="the settings in force (defaults, then the bundle's "
                                                  "settings.json, then the command line's flags)")


class Reloaded(BaseModel):
    status: str
    name: str
    version: str
    previous_version: str


class Status(BaseModel):
    status: str


def errors(*statuses: int, public: bool = False) -> dict:
    """Documented error answers; every route but the probes may answer 401 (when keys are on)."""
    return {status: {"model": ErrorResponse} for status in (statuses if public else (401, *statuses))}


IMAGE_ERRORS = errors(403, 404, 413, 415, 422, 503)
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            MULTIPART: {"schema": {"type": "object", "required": ["image"],
                                   "properties": {"image": {"type": "string", "format": "binary"}}}},
            JSON: {"schema": PredictJson.model_json_schema()},
        },
    }
}
BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {MULTIPART: {"schema": {
            "type": "object", "required": ["images"],
            "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}},
    }
}


def bundle_metrics(bundle: Bundle) -> ModelMetrics | None:
    """The metrics /metadata shows: None for a bundle that carries none (a model never evaluated, such
    as the benchmark's untrained one); metrics in another layout stop the service (one line)."""
    if not bundle.metadata.get("metrics"):
        return None
    try:
        return ModelMetrics.model_validate(bundle.metadata.get("metrics"))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(["metrics", *map(str, first["loc"])])
        raise BundleError(f"{bundle.folder / METADATA}: {where}: {first['msg']} (not the val/test layout of this "
                          "version's export); re-export the model with `dvc repro` and release it again") from None


def create_app(settings: Settings, resolve: Callable[[], Settings] | None = None,
               reload_on_sighup: bool = False) -> Service:
    """The service on ``settings``. A reload builds it again on ``resolve()`` (default: the same
    settings; `python -m serve` re-reads the bundle's settings and the key file). Raises
    BundleError when the bundle cannot be served."""
    metrics = Metrics()  # one registry for the process: counters go on across reloads
    return Service(build_app(settings, metrics), lambda: build_app((resolve or (lambda: settings))(), metrics),
                   reload_on_sighup)


def build_app(settings: Settings, metrics: Metrics) -> FastAPI:
    """One bundle's app: its batcher, routes and middleware."""
    bundle = Bundle.load(settings.bundle, settings.threads, spin=False, precision=settings.precision)
    model_metrics = bundle_metrics(bundle)
    method = method_of(bundle)
    state: dict = {}

    def on_batch(size: int) -> None:
        metrics.batch_sizes.observe(size)
        metrics.images.inc(size)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        batcher = Batcher(bundle.predict, settings.max_batch, settings.max_wait_ms, settings.max_queue, on_batch,
                          settings.workers)
        batcher.start()
        metrics.queue_depth.set_function(lambda: batcher.depth)
        state["batcher"] = batcher
        yield
        state.pop("batcher")
        await batcher.stop()

    app = FastAPI(title="Image classifier", version=bundle.version, lifespan=lifespan,
                  description=f"{bundle.name} on ONNX Runtime: {len(bundle.labels)} labels, "
                              f"{bundle.image_size} px letterboxed input")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return JSONResponse(ApiError(422, "invalid_field", f"{where}: {first['msg']}").body(), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        status = 422 if exc.status_code == 400 else exc.status_code
        return JSONResponse(ApiError(status, code, str(exc.detail)).body(), status, headers=exc.headers)

    async def image_bytes(request: Request) -> tuple[bytes, int | None]:
        ctype = content_type(request)
        if ctype == MULTIPART:
            form = await read_form(request, settings.max_body_bytes)
            if "image" not in form:
                raise ApiError(422, "missing_field", "multipart field 'image' is required")
            return await upload_bytes(form["image"], "image"), None
        if ctype == JSON:
            body = parse_json(await request.body())
            data = await asyncio.to_thread(bytes_from_json, body, settings.max_body_bytes, settings.remote,
                                           settings.path_root)
            return data, body.top_k
        raise unsupported(ctype)

    async def predict_bytes(data: bytes, with_features: bool = False):  # type: ignore[no-untyped-def]
        batcher: Batcher | None = state.get("batcher")
        if batcher is None:
            raise ApiError(503, "not_ready", "the service is starting or stopping", {"Retry-After": "1"})
        with batcher.coming():
            original, pixels, geometry = await asyncio.to_thread(
                decode, data, bundle.image_size, bundle.pad_color, bundle.resample, settings.max_pixels)
        try:  # no await between leaving `coming` and queueing: the batcher never misses this image
            answer = await batcher.submit(pixels, with_features)
        except QueueFull as exc:
            raise overloaded(exc) from None
        note_batch(answer.batch_size)
        return original, pixels, geometry, answer.probabilities, answer.features

    def overloaded(exc: QueueFull) -> ApiError:
        return ApiError(503, "overloaded", f"too many images waiting ({exc}); retry shortly", {"Retry-After": "1"})

    async def predict_copies(copies: np.ndarray) -> np.ndarray:
        """Probabilities of several images of one request (occlusion's masked copies), through the
        batcher like any other image: they share batches and the queue's limit."""
        batcher: Batcher | None = state.get("batcher")
        if batcher is None:
            raise ApiError(503, "not_ready", "the service is starting or stopping", {"Retry-After": "1"})
        answers = []
        for start in range(0, len(copies), settings.max_queue):  # never more than the queue holds at once
            try:
                answers += await asyncio.gather(*(batcher.submit(copy)
                                                  for copy in copies[start:start + settings.max_queue]))
            except QueueFull as exc:
                raise overloaded(exc) from None
        return np.stack([answer.probabilities for answer in answers])

    def prediction(probabilities: np.ndarray, top_k: int | None) -> Prediction:
        order = np.argsort(-probabilities, kind="stable")[:top_k]
        best = int(order[0])
        return Prediction(label=bundle.labels[best], confidence=float(probabilities[best]),
                          scores={bundle.labels[i]: float(probabilities[i]) for i in order},
                          model=ModelInfo(name=bundle.name, version=bundle.version))

    @app.get("/healthz", response_model=Status, summary="the process is up")
    async def healthz() -> Status:
        return Status(status="ok")

    @app.get("/readyz", response_model=Status, responses=errors(503, public=True),
             summary="the model is loaded and batching (503 while starting or draining)")
    async def readyz() -> Status:
        if "batcher" not in state or app.state.service.draining:
            raise ApiError(503, "not_ready", "the service is starting or stopping", {"Retry-After": "1"})
        return Status(status="ready")

    @app.get("/metadata", response_model=Metadata, responses=errors(), summary="the model behind the service")
    async def metadata() -> Metadata:
        return Metadata(name=bundle.name, version=bundle.version, labels=bundle.labels,
                        input_size=bundle.image_size, metrics=model_metrics,
                        dataset=str(bundle.metadata.get("dataset", "")),
                        class_activation_maps=bundle.cam_weights is not None, attention=method,
                        precision=bundle.precision, allow_remote=settings.remote.enabled,
                        settings=ServiceSettings(**settings.public()))

    @app.post("/predict", response_model=Prediction, responses=IMAGE_ERRORS, openapi_extra=IMAGE_BODY,
              summary="classify one image (multipart field 'image', or JSON image_base64 / url / path)")
    async def predict(request: Request, top_k: int | None = Query(None, ge=1)) -> Prediction:
        data, json_top_k = await image_bytes(request)
        _, _, _, probabilities, _ = await predict_bytes(data)
        return prediction(probabilities, top_k or json_top_k)

    @app.post("/predict/batch", response_model=BatchResponse, responses=errors(413, 415, 422, 503),
              openapi_extra=BATCH_BODY, summary="classify several images (repeated multipart field 'images')")
    async def predict_batch(request: Request, top_k: int | None = Query(None, ge=1)) -> BatchResponse:
        ctype = content_type(request)
        if ctype != MULTIPART:
            raise unsupported(ctype) if ctype != JSON else ApiError(
                415, "unsupported_media", "/predict/batch takes multipart/form-data (repeated field 'images')")
        form = await read_form(request, settings.max_body_bytes)
        uploads = form.getlist("images")
        if not uploads:
            raise ApiError(422, "missing_field", "multipart field 'images' is required (once per image)")
        not_files = [i for i, upload in enumerate(uploads) if not isinstance(upload, UploadFile)]
        if not_files:  # a malformed request as a whole, not one bad image among good ones
            raise ApiError(422, "missing_field", f"images[{not_files[0]}]: multipart field 'images' must be a file")
        if len(uploads) > settings.max_batch_images:
            raise ApiError(413, "too_many_images", f"{len(uploads)} images in one request; at most "
                                                   f"{settings.max_batch_images}")

        async def one(index: int, upload) -> Prediction | ErrorResponse:  # type: ignore[no-untyped-def]
            try:
                _, _, _, probabilities, _ = await predict_bytes(await upload_bytes(upload, "images"))
                return prediction(probabilities, top_k)
            except ApiError as exc:  # this image's own error; the others are still answered
                return ErrorResponse.model_validate(exc.named(f"images[{index}]").body())

        return BatchResponse(results=list(await asyncio.gather(*(one(i, u) for i, u in enumerate(uploads)))))

    @app.post("/annotate", responses={200: {"content": {"image/png": {}}, "description": "annotated PNG",
                                            "headers": {METHOD_HEADER: {
                                                "description": "class_activation_map or occlusion",
                                                "schema": {"type": "string"}}}},
                                      **IMAGE_ERRORS},
              response_class=Response, openapi_extra=IMAGE_BODY,
              summary="the image with a heatmap of what the model looked at, a box and the label (PNG)")
    async def annotate(request: Request) -> Response:
        data, _ = await image_bytes(request)
        cam = method == "class_activation_map"
        original, pixels, geometry, probabilities, features = await predict_bytes(data, with_features=cam)
        best = int(np.argmax(probabilities))
        heat = await attention_map(bundle, pixels, features, best, predict_copies, geometry=geometry)
        png = await asyncio.to_thread(draw_annotation, original, heat, geometry, bundle.image_size,
                                      bundle.labels[best], float(probabilities[best]))
        return Response(png, media_type="image/png", headers={METHOD_HEADER: method})

    @app.post("/admin/reload", response_model=Reloaded, responses=errors(409),
              summary="load the bundle again (after `dvc pull model.dvc`) and switch to it when ready")
    async def reload() -> Reloaded:
        try:
            new = (await app.state.service.reload()).state.bundle
        except ReloadError as exc:
            raise ApiError(409, "reload_failed", f"the bundle did not load, {bundle.name} {bundle.version} goes "
                                                 f"on serving: {exc}") from None
        return Reloaded(status="reloaded", name=new.name, version=new.version, previous_version=bundle.version)

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics",
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}, **errors()})
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    add_page(app)
    routes = {route.path for route in app.routes}
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, upload_timeout=settings.upload_timeout)
    app.add_middleware(KeyCheck, keys=settings.api_keys, public=(*PROBES, *PUBLIC_PATHS),
                       public_prefixes=PUBLIC_PREFIXES)
    app.add_middleware(Timing, metrics=metrics, routes=routes)
    app.add_middleware(AccessLog, routes=routes, model_version=bundle.version)  # outermost: logs every answer
    app.state.bundle, app.state.metrics, app.state.settings = bundle, metrics, settings
    return app
