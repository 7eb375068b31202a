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


# Each field's description is the one place its meaning is written: `--help` of the stage that
# takes it as a flag and docs/reference/parameters.md (python -m tools.reference) both show it.


class DownloadParams(Section):
    fetches_per_core: PositiveInt = Field(16, description="Concurrent downloads in each task; one task runs per "
                                          "core (a process on this machine, or a Ray CPU).")
    processes: NonNegativeInt = Field(0, description="Worker processes on this machine; 0 = one per CPU core. "
                                      "A Ray cluster brings its own CPUs; the output is the same either way.")
    rows_per_task: PositiveInt = Field(256, description="Manifest rows per task: the unit of work sent to a core.")
    shard_size: PositiveInt = Field(1000, description="Images per output tar shard, at most on average (images "
                                    "are placed in shards by content hash).")
    connect_timeout: PositiveFloat = Field(5.0, description="Seconds to open a connection.")
    read_timeout: PositiveFloat = Field(10.0, description="Seconds without a byte before a download is dropped "
                                        "as a timeout.")
    deadline: PositiveFloat = Field(60.0, description="Total seconds per URL, retries and backoff included.")
    retries: NonNegativeInt = Field(3, description="Extra attempts, only after a connection error, HTTP 429 or "
                                    "a 5xx status; 0 = a single attempt.")
    backoff: Annotated[float, Field(ge=0)] = Field(0.5, description="Seconds before the first retry, doubled for "
                                                   "each further one (with jitter); a Retry-After header wins.")
    retry_after_cap: Annotated[float, Field(ge=0)] = Field(30.0, description="Longest Retry-After honoured, "
                                                           "in seconds.")
    max_redirects: NonNegativeInt = Field(5, description="Redirects followed per URL; more, or a loop, drops the "
                                          "row as too_many_redirects.")
    max_bytes: PositiveInt = Field(20_000_000, description="Largest image file in bytes; larger ones are dropped "
                                   "as too_large.")
    formats: list[ImageFormat] = Field(default_factory=lambda: list(FORMATS), min_length=1,
                                       description="Image formats kept, as Pillow names them; images in other "
                                       "formats are dropped as unsupported_format.")
    max_pixels: PositiveInt = Field(40_000_000, description="Largest image in pixels (width x height), a "
                                    "decompression-bomb guard; larger ones are dropped as too_many_pixels.")
    min_side: PositiveInt = Field(32, description="Smallest shorter side in pixels; smaller images are dropped as "
                                  "too_small.")
    min_images_per_class: NonNegativeInt = Field(10, description="A class with fewer kept images fails the stage, "
                                                 "and so stops the pipeline; 0 = no minimum.")
    user_agent: str = Field("image-pipeline-downloader/0.1", description="User-Agent header of every HTTP "
                            "request.")


Channel = Annotated[int, Field(ge=0, le=255)]


class PackParams(Section):
    image_size: PositiveInt = Field(224, description="Side in pixels of the square every image is letterboxed "
                                    "into: the models' input size.")
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.2, description="Share of the images in the validation split, which chooses the best epoch, the best "
        "trial and the served model.")
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.1, description="Share of the images in the held-out test split, which chooses nothing: it is reported "
        "once, at the end.")
    seed: int = Field(42, description="Split seed: changing it reshuffles train, val and test.")
    shard_size: PositiveInt = Field(1000, description="Images per TFRecord shard.")
    pad_color: Annotated[list[Channel], Field(min_length=3, max_length=3)] = Field(
        default_factory=lambda: [0, 0, 0], description="RGB colour (0 to 255 each) of the letterbox padding and "
        "of transparent areas.")
    resample: Resample = Field("bilinear", description="Resampling filter of the resize: nearest, box, bilinear, "
                               "hamming, bicubic or lanczos.")
    processes: NonNegativeInt = Field(0, description="Decode, resize and encode processes on this machine; 0 = "
                                      "one per CPU core. A Ray cluster brings its own CPUs.")

    @model_validator(mode="after")
    def _training_images_left(self) -> PackParams:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must be below 1, so that some images train "
                             f"(got {self.val_fraction} + {self.test_fraction})")
        return self


class AugmentParams(Section):
    flip: bool = Field(True, description="Random horizontal flip.")
    rotation: Annotated[float, Field(ge=0, le=0.5)] = Field(
        0.1, description="Largest random rotation, as a fraction of a full turn (0.1 = 36 degrees); 0 = off.")
    contrast: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.1, description="Largest random contrast change: a factor in [1 - contrast, 1 + contrast]; 0 = off.")


Fraction = Annotated[float, Field(ge=0, lt=1)]


class ResnetParams(Section):
    epochs: PositiveInt = Field(10, description="Training epochs, unless patience stops it earlier.")
    # 16, not 32: from scratch, ResNet50V2 learns per optimizer step, and on a small set a smaller
    # batch gives twice the steps for the same images seen (bench/small_data.py).
    batch_size: PositiveInt = Field(16, description="Images per optimizer step.")
    # A small set repeats inside each epoch (fresh augmentation every pass) until the whole fit
    # makes at least this many optimizer steps: ResNet50V2 from scratch needs a couple of hundred
    # before it learns anything, which ten one-pass epochs of 200 photos never give.
    min_steps: NonNegativeInt = Field(250, description="A small training set repeats within each epoch (fresh "
                                      "augmentation each pass) until the whole fit makes at least this many "
                                      "optimizer steps; 0 = one pass per epoch.")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="adam (AdamW with weight_decay), or sgd (with "
                                              "momentum 0.9).")
    learning_rate: PositiveFloat = Field(0.001, description="Learning rate after the warmup, where the schedule "
                                         "starts.")
    schedule: Literal["constant", "cosine"] = Field("cosine", description="constant, or cosine: decays to 0 over "
                                                    "all epochs.")
    label_smoothing: Fraction = Field(0.1, description="Label smoothing of the cross-entropy loss; 0 = off.")
    patience: NonNegativeInt = Field(5, description="Epochs without a better val loss before training stops "
                                     "(the best epoch's weights are kept); 0 = never stop early.")
    class_weighting: bool = Field(True, description="Weight the loss so that rare classes count as much as "
                                  "common ones.")
    augment: bool = Field(True, description="Apply the augment: section to the training images.")
    dropout: Fraction = Field(0.0, description="Dropout rate before the classification head; 0 = none.")
    # 0.9, not Keras' 0.99: at inference BatchNormalization uses running statistics, which at 0.99
    # still hold most of their initial values after the few hundred steps a small data set gives.
    batchnorm_momentum: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.9, description="Momentum of every batch normalization in the backbone (Keras' own: 0.99).")
    warmup_epochs: NonNegativeInt = Field(1, description="Epochs over which the learning rate rises linearly "
                                          "from 0, before the schedule; 0 = no warmup.")
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.0, description="Decoupled weight decay (AdamW, or "
                                                        "SGD's weight_decay); 0 = none.")
    weights: str = Field("none", description="Starting weights of the backbone: none (from scratch), imagenet "
                         "(Keras downloads them: needs internet) or the path of a ResNet50V2 .weights.h5 file "
                         "(declare it as a dependency in dvc.yaml).")
    freeze_epochs: NonNegativeInt = Field(0, description="With weights: epochs that train only the new head "
                                          "before the whole network.")
    seed: int = Field(42, description="Seed of the initial weights, the shuffling and the augmentation.")


# AutoKeras' ImageBlock architectures. EfficientNet is left out: AutoKeras pairs it with ImageNet
# weights, and nothing may be downloaded at run time.
BlockType = Literal["vanilla", "resnet", "xception"]


class AutomlParams(Section):
    max_trials: PositiveInt = Field(10, description="Models the search tries.")
    epochs: PositiveInt = Field(20, description="Most epochs per trial, and for the winner's training on the "
                                "whole split.")
    batch_size: PositiveInt = Field(32, description="Images per optimizer step, in the search and for the winner.")
    tuner: Literal["greedy", "bayesian", "hyperband", "random"] = Field(
        "greedy", description="Search algorithm: greedy (AutoKeras' known-good configurations first), bayesian, "
        "hyperband or random.")
    block_types: list[BlockType] = Field(default_factory=lambda: ["vanilla", "resnet", "xception"], min_length=1,
                                         description="ImageBlock architectures searched (never with ImageNet "
                                         "weights).")
    # A lever for searches on a CPU.
    input_size: NonNegativeInt = Field(0, description="Side in pixels the search resizes the images to, with a "
                                       "Resizing layer at the model's front, so the saved model still takes "
                                       "pack.image_size images; 0 = no resizing.")
    fixed: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description='AutoKeras hyperparameters pinned for every trial, by their full names '
        'as trials.csv lists them, e.g. {"image_block_1/augment": true}.')
    patience: NonNegativeInt = Field(5, description="Epochs without a better val loss before a trial stops; "
                                     "0 = never stop early.")
    class_weighting: bool = Field(True, description="Weight the loss so that rare classes count as much as "
                                  "common ones.")
    # AutoKeras takes arrays, so the search's images are held in memory.
    search_images: PositiveInt = Field(2000, description="The search runs on at most this many training images "
                                       "(a seeded, class-balanced sample; val is sampled alike); the winner then "
                                       "trains on the whole split.")
    seed: int = Field(42, description="Seed of the tuner, the sample and the initial weights.")


class TrainParams(Section):
    head: Literal["auto", "softmax", "sigmoid"] = Field(
        "auto", description="Output layer: auto (sigmoid for exactly two classes, else softmax), softmax or "
        "sigmoid.")
    strategy: Literal["default", "mirrored", "multi_worker"] = Field(
        "default", description="tf.distribute strategy: default (one device), mirrored (all local devices) or "
        "multi_worker (the cluster in TF_CONFIG).")
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = Field(
        "float32", description="float32, mixed_float16 (float16 compute, for GPUs) or mixed_bfloat16 (for CPUs "
        "with BF16, such as AVX-512 BF16 or AMX, and TPUs); variables and the saved model stay float32.")
    deterministic: bool = Field(True, description="true: op determinism, so the same inputs give a bit-identical "
                                "model; false: faster (mostly on GPUs), and reruns differ slightly.")
    resnet: ResnetParams = Field(default_factory=ResnetParams, description="ResNet50V2, trained from scratch or "
                                 "from given weights by the train_resnet stage.")
    automl: AutomlParams = Field(default_factory=AutomlParams, description="The AutoKeras ImageClassifier "
                                 "search of the train_automl stage.")


class ExportParams(Section):
    opset: Annotated[int, Field(ge=17, le=21)] = Field(17, description="ONNX opset; 17 runs on every current "
                                                       "ONNX Runtime.")
    max_abs_diff: PositiveFloat = Field(1e-4, description="Parity gate: the largest allowed difference between a "
                                        "Keras and an ONNX Runtime probability on val.")
    batch_size: PositiveInt = Field(64, description="Images per inference batch in the parity check.")
    quantize: bool = Field(False, description="Also write model.int8.onnx (static INT8, calibrated on training "
                           "images).")
    calibration_images: PositiveInt = Field(128, description="Training images that calibrate the INT8 model.")


class ServeParams(Section):
    model: Literal["best", "resnet50v2", "autokeras"] = Field(
        "best", description="Model to serve: best (the higher val macro-F1 among the models that beat the "
        "baseline), resnet50v2 or autokeras.")
    max_batch: PositiveInt = Field(SERVING.max_batch, description="Most images in one ONNX Runtime call (also "
                                   "Triton's max_batch_size).")
    max_wait_ms: Annotated[float, Field(ge=0)] = Field(
        SERVING.max_wait_ms, description="Milliseconds the first request of a batch waits for others to join it.")
    max_queue: PositiveInt = Field(SERVING.max_queue, description="Images waiting to be predicted; beyond it, "
                                   "requests are answered 503 with Retry-After.")
    max_body_bytes: PositiveInt = Field(SERVING.max_body_bytes, description="Largest request body in bytes; "
                                        "larger requests are answered 413.")
    max_pixels: PositiveInt = Field(SERVING.max_pixels, description="Largest image in pixels; larger images are "
                                    "answered 422 (decompression-bomb guard).")
    triton_instances: PositiveInt = Field(1, description="Model instances in the Triton config (on CPU).")
    triton_max_queue_delay_us: NonNegativeInt = Field(5000, description="Triton's dynamic batching delay, in "
                                                      "microseconds.")


class Params(Section):
    download: DownloadParams = Field(default_factory=DownloadParams, description="Fetch, validate and shard the "
                                     "images of the manifests and class folders.")
    pack: PackParams = Field(default_factory=PackParams, description="Letterbox the downloaded images into "
                             "TFRecord shards, split into train, val and test.")
    augment: AugmentParams = Field(default_factory=AugmentParams, description="Random changes to the training "
                                   "images, made in the input pipeline (imgpipe/records/read.py) when "
                                   "train.resnet.augment is true; never applied to val or test.")
    train: TrainParams = Field(default_factory=TrainParams, description="What both trainers share; their own keys "
                               "are in train.resnet and train.automl.")
    export: ExportParams = Field(default_factory=ExportParams, description="The ONNX serving bundle of each "
                                 "trained model, gated on parity with Keras on the whole val split.")
    serve: ServeParams = Field(default_factory=ServeParams, description="The released model, its service's "
                               "settings (written into the bundle) and its Triton repository.")


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


def yaml_value(value: Any) -> str:
    """``value`` written the way params.yaml writes it (``true``, ``[BMP, GIF]``, ``{}``), on one line."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6)
    return text.removesuffix("\n").removesuffix("\n...").strip()


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
        default = yaml_value(field.get_default(call_default_factory=True))
        # argparse expands %-formats in help; a description is plain text.
        kwargs["help"] = f"{field.description} (params.yaml default: {default})".replace("%", "%%")
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
