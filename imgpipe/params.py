"""Load and validate ``params.yaml``; let a stage's argparse flags override its section.

Every stage reads its parameters through :func:`load`. Unknown keys and wrong types are
refused with a single line that names the key (``ParamsError``, exit code 2), so a typo in
``params.yaml`` never turns into a silent default or a traceback deep inside a stage.
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from imgpipe.bundle import SERVING
from imgpipe.errors import ParamsError
from imgpipe.images import FORMATS, RESAMPLE

DEFAULT_PATH = Path("params.yaml")
# Settings that belong to the data set in data/ (the demo digits train at 96 px); they win over
# params.yaml, so params.yaml keeps the defaults for everyone's own data and is never rewritten.
DATA_PATH = Path("data/params.yaml")
DEFAULT_PATHS = (DEFAULT_PATH, DATA_PATH)

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]

# Pillow format names the download stage can be asked to keep.
ImageFormat = Literal[FORMATS]  # type: ignore[valid-type]
Resample = Literal[tuple(RESAMPLE)]  # type: ignore[valid-type]


class Section(BaseModel):
    # strict: "8" is not an int and 1 is not a bool; forbid: a misspelt key is an error.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DownloadParams(Section):
    fetches_per_core: PositiveInt = 16  # one task per core (a process, or a Ray CPU), each with this many downloads
    processes: NonNegativeInt = 0  # on this machine (not on a Ray cluster): 0 = one per CPU core
    rows_per_task: PositiveInt = 256
    shard_size: PositiveInt = 1000  # images per output shard, at most on average (imgpipe.shards)
    connect_timeout: PositiveFloat = 5.0
    read_timeout: PositiveFloat = 10.0
    deadline: PositiveFloat = 60.0
    retries: NonNegativeInt = 3
    backoff: Annotated[float, Field(ge=0)] = 0.5
    retry_after_cap: Annotated[float, Field(ge=0)] = 30.0
    max_redirects: NonNegativeInt = 5
    max_bytes: PositiveInt = 20_000_000
    formats: list[ImageFormat] = Field(default_factory=lambda: list(FORMATS), min_length=1)
    max_pixels: PositiveInt = 40_000_000
    min_side: PositiveInt = 32
    min_images_per_class: NonNegativeInt = 10
    user_agent: str = "image-pipeline-downloader/0.1"


Channel = Annotated[int, Field(ge=0, le=255)]


class PackParams(Section):
    image_size: PositiveInt = 224
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2  # chooses: best epoch, best trial, served model
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1  # chooses nothing: reported once, at the end
    seed: int = 42
    shard_size: PositiveInt = 1000
    pad_color: Annotated[list[Channel], Field(min_length=3, max_length=3)] = Field(default_factory=lambda: [0, 0, 0])
    resample: Resample = "bilinear"
    processes: NonNegativeInt = 0

    @model_validator(mode="after")
    def _training_images_left(self) -> PackParams:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must be below 1, so that some images train "
                             f"(got {self.val_fraction} + {self.test_fraction})")
        return self


class AugmentParams(Section):
    flip: bool = True  # random horizontal flip
    rotation: Annotated[float, Field(ge=0, le=0.5)] = 0.1  # largest turn, as a fraction of a full turn; 0 = off
    contrast: Annotated[float, Field(ge=0, lt=1)] = 0.1  # largest contrast change (factor 1 +- this); 0 = off


Fraction = Annotated[float, Field(ge=0, lt=1)]


class ResnetParams(Section):
    epochs: PositiveInt = 10
    # 16, not 32: from scratch, ResNet50V2 learns per optimizer step, and on a small set a smaller
    # batch gives twice the steps for the same images seen (bench/small_data.py).
    batch_size: PositiveInt = 16
    # A small set repeats inside each epoch (fresh augmentation every pass) until the whole fit
    # makes at least this many optimizer steps: ResNet50V2 from scratch needs a couple of hundred
    # before it learns anything, which ten one-pass epochs of 200 photos never give. 0 = one pass.
    min_steps: NonNegativeInt = 250
    optimizer: Literal["adam", "sgd"] = "adam"
    learning_rate: PositiveFloat = 0.001
    schedule: Literal["constant", "cosine"] = "cosine"  # cosine: decays to 0 over all epochs
    label_smoothing: Fraction = 0.1
    patience: NonNegativeInt = 5  # epochs without a better val loss before stopping; 0 = never stop early
    class_weighting: bool = True  # weight the loss so that rare classes count as much as common ones
    augment: bool = True  # apply the augment: section to the training images
    dropout: Fraction = 0.0
    # 0.9, not Keras' 0.99: at inference BatchNormalization uses running statistics, which at 0.99
    # still hold most of their initial values after the few hundred steps a small data set gives.
    batchnorm_momentum: Annotated[float, Field(gt=0, lt=1)] = 0.9
    warmup_epochs: NonNegativeInt = 1  # the learning rate rises linearly from 0 over these epochs
    weight_decay: Annotated[float, Field(ge=0)] = 0.0  # decoupled (AdamW, SGD's weight_decay)
    # none (from scratch), imagenet (Keras downloads them: needs internet), or the path of a
    # .weights.h5 file of this architecture (declare it as a dependency in dvc.yaml)
    weights: str = "none"
    freeze_epochs: NonNegativeInt = 0  # with weights: epochs training only the new head first
    seed: int = 42


# AutoKeras' ImageBlock architectures. EfficientNet is left out: AutoKeras pairs it with ImageNet
# weights, and nothing may be downloaded at run time.
BlockType = Literal["vanilla", "resnet", "xception"]


class AutomlParams(Section):
    max_trials: PositiveInt = 10
    epochs: PositiveInt = 20  # per trial
    batch_size: PositiveInt = 32
    tuner: Literal["greedy", "bayesian", "hyperband", "random"] = "greedy"
    block_types: list[BlockType] = Field(default_factory=lambda: ["vanilla", "resnet", "xception"], min_length=1)
    # Search on images resized to this side by a Resizing layer at the model's front, so the saved
    # model still takes pack.image_size images. 0: no resizing. A lever for searches on a CPU.
    input_size: NonNegativeInt = 0
    # AutoKeras hyperparameters pinned for every trial, by their full names as trials.csv lists
    # them, e.g. {"image_block_1/augment": true}.
    fixed: dict[str, str | int | float | bool] = Field(default_factory=dict)
    patience: NonNegativeInt = 5  # epochs without a better val loss before a trial stops; 0 = never stop early
    class_weighting: bool = True
    # The search runs on at most this many training images (a seeded, class-balanced sample held in
    # memory: AutoKeras takes arrays); the winner is then trained on the whole split, streamed.
    search_images: PositiveInt = 2000
    seed: int = 42


class TrainParams(Section):
    head: Literal["auto", "softmax", "sigmoid"] = "auto"  # auto: sigmoid for exactly two classes
    strategy: Literal["default", "mirrored", "multi_worker"] = "default"  # tf.distribute strategy
    # float32, or mixed: float16 compute for GPUs, bfloat16 for CPUs with BF16 (AVX-512 BF16, AMX) and
    # TPUs. Variables and the saved model stay float32 either way.
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = "float32"
    # true: op determinism, so the same inputs give a bit-identical model; false: faster (most on
    # GPUs), and reruns differ slightly.
    deterministic: bool = True
    resnet: ResnetParams = Field(default_factory=ResnetParams)
    automl: AutomlParams = Field(default_factory=AutomlParams)


class ExportParams(Section):
    opset: Annotated[int, Field(ge=17, le=21)] = 17  # ONNX opset; 17 runs on every current ONNX Runtime
    # Parity gate: Keras and ONNX Runtime on the whole validation split.
    max_abs_diff: PositiveFloat = 1e-4  # largest allowed probability difference
    batch_size: PositiveInt = 64  # images per inference batch in the parity check
    quantize: bool = False  # also write model.int8.onnx (static INT8, calibrated on training images)
    calibration_images: PositiveInt = 128


class ServeParams(Section):
    model: Literal["best", "resnet50v2", "autokeras"] = "best"  # best: the higher validation macro-F1
    max_batch: PositiveInt = SERVING.max_batch  # requests coalesced into one ONNX Runtime call
    max_wait_ms: Annotated[float, Field(ge=0)] = SERVING.max_wait_ms  # how long the first request waits
    max_queue: PositiveInt = SERVING.max_queue  # images waiting; more are answered 503 with Retry-After
    max_body_bytes: PositiveInt = SERVING.max_body_bytes  # larger requests are answered 413
    max_pixels: PositiveInt = SERVING.max_pixels  # larger images are answered 422 (decompression bombs)
    triton_instances: PositiveInt = 1  # Triton model instances (CPU)
    triton_max_queue_delay_us: NonNegativeInt = 5000


class Params(Section):
    download: DownloadParams = Field(default_factory=DownloadParams)
    pack: PackParams = Field(default_factory=PackParams)
    augment: AugmentParams = Field(default_factory=AugmentParams)
    train: TrainParams = Field(default_factory=TrainParams)
    export: ExportParams = Field(default_factory=ExportParams)
    serve: ServeParams = Field(default_factory=ServeParams)


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if error["type"] == "value_error" and isinstance(error.get("input"), dict):  # a check across keys
        return f"{key}: {str(error['ctx']['error'])}"
    got = error.get("input")
    return f"{key}: {error['msg'][0].lower()}{error['msg'][1:]} (got {got!r})"


def validate(raw: Any, source: str = str(DEFAULT_PATH)) -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ParamsError(f"{source}: {_describe(first)}{more}") from None


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        hint = "an empty file means params.yaml alone" if path == DATA_PATH else "run from the repository root"
        raise ParamsError(f"{path}: file not found ({hint}, or pass --params)") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        elif value is not None:
            merged[key] = value
    return merged


def load(paths: Path | list[Path] | tuple[Path, ...] = DEFAULT_PATH, overrides: dict[str, Any] | None = None) -> Params:
    """Read ``paths`` (later files win), apply nested ``{section: {key: value}}`` overrides, validate.

    Each file is validated on its own first, so an error names the file that holds the bad key."""
    paths = [paths] if isinstance(paths, Path) else list(paths)
    merged: dict[str, Any] = {}
    for path in paths:
        raw = read_yaml(path)
        validate(raw, source=str(path))
        merged = _merge(merged, raw)
    return validate(_merge(merged, overrides or {}), source=" + ".join(map(str, paths)))


# --- argparse: one flag per key of a section --------------------------------------------


def _flag_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """Map a field annotation to argparse ``type``/``nargs``/``choices``."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _flag_type(typing.get_args(annotation)[0])
    if origin is list:
        inner, extra = _flag_type(typing.get_args(annotation)[0])
        return inner, {**extra, "nargs": "+"}
    if origin is Literal:
        return str, {"choices": list(typing.get_args(annotation))}
    if annotation is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    return annotation, {}


def _section_model(section: str) -> type[Section]:
    model: type[Section] = Params
    for part in section.split("."):
        model = model.model_fields[part].annotation  # type: ignore[assignment]
    return model


def add_section_flags(parser: argparse.ArgumentParser, section: str) -> None:
    """Add ``--key`` for every plain key of ``section`` (dotted for nested ones, e.g. ``train.resnet``);
    the default None leaves the value to params.yaml."""
    if not any("--params" in action.option_strings for action in parser._actions):
        parser.add_argument("--params", type=Path, nargs="+", default=list(DEFAULT_PATHS), metavar="YAML",
                            help="parameter files, later ones win (default: params.yaml data/params.yaml)")
    model = _section_model(section)
    group = parser.add_argument_group(f"overrides for params.yaml '{section}:'")
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, Section):
            continue  # a nested section has flags of its own
        kind, extra = _flag_type(field.annotation)
        kwargs: dict[str, Any] = {"dest": f"{section.replace('.', '__')}__{name}", "default": None, **extra}
        if kind is not None:
            kwargs["type"] = kind
            kwargs["metavar"] = name.upper()
        kwargs["help"] = f"{section}.{name} (params.yaml default: {field.get_default(call_default_factory=True)})"
        group.add_argument(f"--{name.replace('_', '-')}", **kwargs)


def load_for(args: argparse.Namespace, section: str | None = None) -> Params:
    """Load params with the flags added by :func:`add_section_flags` applied on top."""
    overrides: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if "__" not in dest or value is None:
            continue
        *path, key = dest.split("__")
        node = overrides
        for part in path:
            node = node.setdefault(part, {})
        node[key] = value
    paths = list(args.params)
    if paths == list(DEFAULT_PATHS) and not DATA_PATH.exists():
        paths.remove(DATA_PATH)  # by default the data set's settings are optional (DVC still wants the file)
    return load(paths, overrides)
