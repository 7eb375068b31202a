"""/annotate's attention map for every head: the class activation map where the head allows it,
occlusion sensitivity (masked copies through the same ONNX session) otherwise; unit-level on the
exported test bundles, then through a real service."""

from __future__ import annotations

import asyncio
import io
import itertools

import httpx
import numpy as np
import pytest
from PIL import Image

from imgpipe.images import Geometry, letterbox
from serve.app import Settings, create_app
from serve.attention import GRID, METHOD_HEADER, attention_map, boxes, method_of, occlusion_drops, patches
from serve.bundle import Bundle
from serve.running import running
from tests import images


@pytest.fixture(scope="module")
def loaded(bundles) -> dict[str, Bundle]:
    return {name: Bundle.load(bundles[name]) for name in ("cam", "flat")}


def direct(bundle: Bundle, calls: list[np.ndarray] | None = None):  # type: ignore[no-untyped-def]
    """``predict`` straight on the bundle's ONNX session (the service's goes through its batcher)."""

    async def predict(batch: np.ndarray) -> np.ndarray:
        if calls is not None:
            calls.append(batch.copy())
        return bundle.predict(batch)[0]

    return predict


async def never(batch: np.ndarray) -> np.ndarray:
    raise AssertionError("the class activation map needs no extra forward pass")


def square_of(data: bytes, bundle: Bundle) -> tuple[np.ndarray, Geometry, int]:
    pixels, geometry = bundle.preprocess(data)
    return pixels, geometry, int(np.argmax(bundle.predict(pixels[None])[0][0]))


def hidden(pixels: np.ndarray, top: int, bottom: int, left: int, right: int, color) -> np.ndarray:  # type: ignore[no-untyped-def]
    copy = pixels.copy()
    copy[top:bottom, left:right] = color
    return copy


def test_the_head_decides_the_method(loaded):
    assert method_of(loaded["cam"]) == "class_activation_map"
    assert method_of(loaded["flat"]) == "occlusion"


def test_the_class_activation_map_is_the_bundles_own(loaded):
    bundle = loaded["cam"]
    pixels, geometry, best = square_of(images.rgb_png(5, size=(48, 40)), bundle)
    probabilities, features = bundle.predict(pixels[None], with_features=True)
    for index in range(len(bundle.labels)):
        heat = asyncio.run(attention_map(bundle, pixels, features[0], index, never, geometry=geometry))
        np.testing.assert_array_equal(heat, bundle.class_activation_map(features[0], index))
    with pytest.raises(ValueError, match="features"):
        asyncio.run(attention_map(bundle, pixels, None, best, never))


def test_patches_cover_the_image_and_not_the_padding():
    assert GRID == 7  # ResNet50V2's last feature map at 224 px is 7 x 7 too
    rows, cols = patches(224, None)
    assert rows.tolist() == cols.tolist() == [32 * i for i in range(8)]
    # A 4:3 photo letterboxed into 224: 224 x 168 from row 28; 7 columns x 5 rows of patches (33-34 px
    # high), none on the padding.
    rows, cols = patches(224, Geometry(640, 480, 0.35, 0, 28, 224, 168))
    assert rows.tolist() == [28, 62, 95, 129, 162, 196] and cols.tolist() == [32 * i for i in range(8)]
    # A sliver of an image is still one patch across.
    rows, cols = patches(224, Geometry(1000, 10, 0.224, 0, 111, 224, 2))
    assert rows.tolist() == [111, 113] and len(cols) == GRID + 1


def test_occlusion_masks_each_image_patch_once_with_the_pad_colour_and_is_deterministic(loaded):
    bundle = loaded["flat"]
    pixels, geometry, best = square_of(images.rgb_png(3, size=(48, 30)), bundle)  # 32 x 20 in the 32 px square
    assert (geometry.offset_y, geometry.height) == (6, 20)
    calls: list[np.ndarray] = []
    first = asyncio.run(attention_map(bundle, pixels, None, best, direct(bundle, calls), geometry=geometry))
    second = asyncio.run(attention_map(bundle, pixels, None, best, direct(bundle), geometry=geometry))
    assert first.dtype == np.float64 and first.shape == (32, 32)
    np.testing.assert_array_equal(first, second)
    (copies,) = calls  # one call: every copy goes through the same predict, batched
    rows, cols = patches(32, geometry)
    assert rows.tolist() == [6, 11, 16, 21, 26] and len(cols) == GRID + 1
    assert len(copies) == 1 + (len(rows) - 1) * (len(cols) - 1) == 1 + 4 * 7
    np.testing.assert_array_equal(copies[0], pixels)  # the unmasked square, for the baseline
    for copy, box in zip(copies[1:], boxes(rows, cols), strict=True):
        np.testing.assert_array_equal(copy, hidden(pixels, *box, bundle.pad_color))
    assert not first[:6].any() and not first[26:].any()  # no patch of the padding, no heat there either
    assert first.max() > 0


def test_occlusion_peaks_on_the_only_patch_that_matters(loaded):
    """A black (pad colour) picture with one coloured block: hiding black with black changes nothing,
    so only the block's patches can move the prediction. The block is off the diagonal and the image
    is not square, so a map transposed, or shifted by the letterbox offset, puts the peak elsewhere."""
    bundle = loaded["flat"]
    assert tuple(bundle.pad_color) == (0, 0, 0)
    canvas = Image.new("RGB", (32, 24), (0, 0, 0))
    empty, geometry = letterbox(canvas, 32)
    assert (geometry.offset_y, geometry.height) == (4, 24)
    rows, cols = patches(32, geometry)
    block = (rows[2], rows[4], cols[1], cols[3])  # top, bottom, left, right in the square: 2 x 2 patches
    assert block == (14, 23, 5, 14)
    best = int(np.argmax(bundle.predict(empty[None])[0][0]))
    colors = [color for color in itertools.product((0, 128, 255), repeat=3) if any(color)]
    candidates = np.stack([hidden(empty, *block, color) for color in colors])
    gains = bundle.predict(candidates)[0][:, best] - bundle.predict(empty[None])[0][0][best]
    pixels = candidates[int(np.argmax(gains))]  # the block colour that speaks most for the class
    assert gains.max() > 0.005 and int(np.argmax(bundle.predict(pixels[None])[0][0])) == best

    _, _, drops = asyncio.run(occlusion_drops(bundle, pixels, best, direct(bundle), geometry))
    inside = np.zeros_like(drops, dtype=bool)
    inside[2:4, 1:3] = True
    assert not drops[~inside].any() and drops[inside].max() > 0

    heat = asyncio.run(attention_map(bundle, pixels, None, best, direct(bundle), geometry=geometry))
    top, left = np.unravel_index(int(np.argmax(heat)), heat.shape)
    assert block[0] <= top < block[1] and block[2] <= left < block[3], (top, left)


@pytest.mark.parametrize("seed", [1, 2])
def test_hiding_the_hottest_patch_costs_the_class_more_than_hiding_the_coldest(loaded, seed):
    """Checked with the ONNX session directly, masking by hand, not through the map's own code."""
    bundle = loaded["flat"]
    pixels, geometry, best = square_of(images.rgb_png(seed, size=(40, 48)), bundle)
    heat = asyncio.run(attention_map(bundle, pixels, None, best, direct(bundle), geometry=geometry))
    rows, cols = patches(bundle.image_size, geometry)
    centres = [((top + bottom) // 2, (left + right) // 2, (top, bottom, left, right))
               for top, bottom, left, right in boxes(rows, cols)]
    values = [heat[y, x] for y, x, _ in centres]
    hottest, coldest = centres[int(np.argmax(values))][2], centres[int(np.argmin(values))][2]
    assert max(values) > min(values)
    copies = np.stack([pixels, hidden(pixels, *hottest, bundle.pad_color), hidden(pixels, *coldest, bundle.pad_color)])
    probabilities = bundle.predict(copies)[0][:, best]
    assert probabilities[0] - probabilities[1] > probabilities[0] - probabilities[2]
    assert probabilities[0] - probabilities[1] > 0


@pytest.mark.parametrize(("name", "method"), [("flat", "occlusion"), ("cam", "class_activation_map")])
def test_annotate_answers_for_every_head_and_names_its_method(bundles, name, method):
    data = images.rgb_png(3, size=(90, 50))
    with running(create_app(Settings(bundle=bundles[name], max_wait_ms=20))) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/metadata").json()["attention"] == method
        response = client.post("/annotate", files={"image": ("x.png", data, "image/png")})
        again = client.post("/annotate", files={"image": ("x.png", data, "image/png")})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png" and response.headers[METHOD_HEADER] == method
    annotated = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
    original = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert annotated.shape == original.shape
    assert (annotated != original).any(axis=2).mean() > 0.2  # the heatmap covers the image, not a corner
    assert (annotated == [255, 0, 0]).all(axis=2).any()  # the box
    assert again.status_code == 200 and again.headers[METHOD_HEADER] == method
