"""Fixtures shared by the trainer tests, and the order the test files run in."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from stages import pack
from tests.test_pack import make_images


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the files for `make test`'s workers, which take whole files in this order (xdist's
    loadfile with --no-loadscope-reorder): the files with the most slow tests first, so that the
    long ones start at once and the many short files fill the gaps at the end. xdist starts each
    of its N workers with two files, so N files without slow tests come right after the N first:
    the longest file's worker is not also handed the next long one while the others are idle."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    files = sorted(dict.fromkeys(item.path for item in items), key=lambda path: -slow[path])  # stable
    workers = getattr(config.option, "numprocesses", None)
    if isinstance(workers, int) and workers > 1 and len(files) > 2 * workers:
        quick = [path for path in files if not slow[path]][-workers:]
        rest = [path for path in files if path not in quick]
        files = rest[:workers] + quick + rest[workers:]
    order = {path: index for index, path in enumerate(files)}
    items.sort(key=lambda item: order[item.path])


PACK_PARAMS = """\
pack:
  image_size: 32
  processes: 1
"""


@pytest.fixture(scope="session")
def records(tmp_path_factory) -> dict[int, Path]:
    """Packed tiny data sets (32 px, 10 images a class) with three classes and with two (the sigmoid head)."""
    root = tmp_path_factory.mktemp("records")
    (root / "params.yaml").write_text(PACK_PARAMS)
    made = {}
    for classes in (3, 2):
        images = root / f"images{classes}"
        make_images(images, {name: 10 for name in ["cat", "dog", "owl"][:classes]})
        pack.main(["--params", str(root / "params.yaml"), "--images", str(images), "--out", str(root / f"tf{classes}"),
                   "--report", str(root / f"pack{classes}.json")])
        made[classes] = root / f"tf{classes}"
    return made


def small_cnn(size: int, classes: int, head: str = "avg"):  # type: ignore[no-untyped-def]
    """A small Keras classifier for export and serving tests: ``avg``/``max`` pooling heads
    (class-activation maps possible), ``flatten`` (not), ``sigmoid`` (one unit, two classes).
    Dropout is there so the test can check that no training-only op reaches ONNX."""
    from imgpipe.training.models import seed_everything

    seed_everything(7)
    import keras

    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="last_conv")(x)
    pool = {"avg": keras.layers.GlobalAveragePooling2D(), "max": keras.layers.GlobalMaxPooling2D(),
            "sigmoid": keras.layers.GlobalAveragePooling2D(), "flatten": keras.layers.Flatten()}[head]
    x = keras.layers.Dropout(0.3)(pool(x))
    units, activation = (1, "sigmoid") if head == "sigmoid" else (classes, "softmax")
    outputs = keras.layers.Dense(units, activation=activation, name="predictions")(x)
    return keras.Model(inputs, outputs)


EXPORT_PARAMS = "export:\n  batch_size: 16\n"


def export_bundle(model, records: Path, root: Path, name: str, *flags: str) -> Path:  # type: ignore[no-untyped-def]
    from imgpipe.training.modelio import save_model
    from stages import export

    save_model(model, root / "models" / name / "model.keras")
    (root / "params.yaml").write_text(EXPORT_PARAMS)
    export.main(["--params", str(root / "params.yaml"), "--model", str(root / "models" / name / "model.keras"),
                 "--records", str(records), "--out", str(root / "onnx" / name), "--timings",
                 str(root / f"{name}.json"), "--reports", str(root / "reports" / name), *flags])
    return root / "onnx" / name


@pytest.fixture(scope="session")
def bundles(records, tmp_path_factory) -> dict[str, Path]:
    """Exported bundles of small models on the tiny records: cam (3 classes, average pooling),
    flat (3 classes, flatten head: no maps), sigmoid (2 classes, one unit)."""
    root = tmp_path_factory.mktemp("bundles")
    return {"cam": export_bundle(small_cnn(32, 3, "avg"), records[3], root, "cam"),
            "flat": export_bundle(small_cnn(32, 3, "flatten"), records[3], root, "flat"),
            "sigmoid": export_bundle(small_cnn(32, 2, "sigmoid"), records[2], root, "sigmoid")}
