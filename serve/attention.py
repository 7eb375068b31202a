"""Where the model looked, for every model the pipeline can produce. NumPy only (no TensorFlow).

Two methods, chosen by the model's head (``method_of``):

- ``class_activation_map``: a global-pooling head (the bundle has ``cam_weights.npy`` and its graph
  outputs ``features``): the last convolution's features weighted by the class's dense kernel
  (``Bundle.class_activation_map``). Free: one forward pass, the one that classified the image.
- ``occlusion``: any other head (a flatten head, as AutoKeras often picks): occlusion sensitivity.
  The image part of the square is cut into a grid of patches; for each patch a copy of the square
  with that patch hidden is classified, all copies through the same ``predict`` (in the service:
  the dynamic batcher, so the copies run as batches through the same ONNX session and the queue
  limits apply). A patch's value is how much the predicted class's probability drops when it is
  hidden (clipped at 0: hiding evidence *against* the class is not attention to it).

    method = method_of(bundle)
    heat = await attention_map(bundle, pixels, features, best, predict, geometry=geometry)

The map is a 2-D float map over the model's square (``serve.annotate.heatmap_on_original`` crops
it to where the image sits and stretches it onto the original).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal

import numpy as np

from imgpipe.images import Geometry
from serve.bundle import Bundle

Method = Literal["class_activation_map", "occlusion"]
METHOD_HEADER = "X-Attention-Method"

# Patches are 1/GRID of the square's side: 32 px at 224, the cells of ResNet50V2's last 7 x 7
# feature map, so occlusion sees as finely as the class activation map it stands in for. A square
# image is 7 x 7 = 49 masked copies (+ the unmasked one), a 4:3 one 7 x 5 (its padding is never
# masked). Measured end to end (`python -m bench.serve --only annotate`, ResNet50V2 at 224 px on
# 2 cores, a square photo): 8 x 8 patches took a median 2.85 s of the 3 s budget, too close; 7 x 7
# took 2.24 s (a 4:3 photo 1.58 s). Overlapping patches (stride half a patch: 13 x 13 = 169
# copies) would cost 3.4x as much for a smoother map, not a more truthful one.
GRID = 7

Predict = Callable[[np.ndarray], Awaitable[np.ndarray]]


def method_of(bundle: Bundle) -> Method:
    """CAM when the head allows it (the bundle loaded ``cam_weights``), otherwise occlusion."""
    return "class_activation_map" if bundle.cam_weights is not None else "occlusion"


def image_box(size: int, geometry: Geometry | None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the image inside the ``size`` square; the whole square when
    the geometry is unknown."""
    if geometry is None:
        return 0, 0, size, size
    return geometry.offset_x, geometry.offset_y, geometry.offset_x + geometry.width, \
        geometry.offset_y + geometry.height


def edges(start: int, length: int, size: int, grid: int) -> np.ndarray:
    """Patch boundaries along one side of the image: cells of about size/grid pixels (at least one
    cell), spread evenly over ``length`` pixels starting at ``start``."""
    cells = max(1, min(length, round(length * grid / size)))
    return start + np.round(np.arange(cells + 1) * length / cells).astype(int)


def patches(size: int, geometry: Geometry | None, grid: int = GRID) -> tuple[np.ndarray, np.ndarray]:
    """Row and column boundaries of the patches: only the image part of the square is cut up
    (the padding is pad-coloured already: hiding it would cost a forward pass and change nothing)."""
    left, top, right, bottom = image_box(size, geometry)
    return edges(top, bottom - top, size, grid), edges(left, right - left, size, grid)


def boxes(rows: np.ndarray, cols: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) of each patch, row by row."""
    return [(int(top), int(bottom), int(left), int(right))
            for top, bottom in zip(rows[:-1], rows[1:], strict=True)
            for left, right in zip(cols[:-1], cols[1:], strict=True)]


def occluded_copies(pixels: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                    mask: tuple[int, int, int]) -> np.ndarray:
    """The unmasked square first, then one copy per patch (``boxes`` order) with the patch set to ``mask``."""
    patched = boxes(rows, cols)
    copies = np.repeat(pixels[None], 1 + len(patched), axis=0)
    for copy, (top, bottom, left, right) in zip(copies[1:], patched, strict=True):
        copy[top:bottom, left:right] = mask
    return copies


def interpolation(centres: np.ndarray, length: int) -> np.ndarray:
    """``length`` x len(centres) float64 weights that linearly interpolate values given at the
    patch centres (in pixels from the start of the image part) at each pixel centre; constant
    beyond the outermost centres."""
    positions = np.arange(length) + 0.5
    identity = np.eye(len(centres))
    return np.stack([np.interp(positions, centres, identity[j]) for j in range(len(centres))], axis=1)


def spread(drops: np.ndarray, rows: np.ndarray, cols: np.ndarray, size: int) -> np.ndarray:
    """The per-patch drops as a smooth size x size float64 map: linear between patch centres over
    the image part (like the bilinear stretch of a CAM), 0 on the padding."""
    heat = np.zeros((size, size), dtype=np.float64)
    top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]
    along_y = interpolation((rows[:-1] + rows[1:]) / 2 - top, bottom - top)
    along_x = interpolation((cols[:-1] + cols[1:]) / 2 - left, right - left)
    heat[top:bottom, left:right] = along_y @ drops @ along_x.T
    return heat


async def occlusion_drops(bundle: Bundle, pixels: np.ndarray, class_index: int, predict: Predict,
                          geometry: Geometry | None = None, grid: int = GRID) -> tuple[np.ndarray, np.ndarray,
                                                                                   np.ndarray]:
    """(row boundaries, column boundaries, rows x columns float64 drops of ``class_index``'s
    probability, each patch hidden alone, clipped at 0)."""
    rows, cols = patches(bundle.image_size, geometry, grid)
    # The mask is the bundle's pad colour: every letterboxed training image showed the model that
    # colour where there is nothing to see (the padding, and transparent areas, are filled with
    # it), so a hidden patch reads as "no evidence here" rather than as a new grey or mean-coloured
    # object; the image mean would also differ from image to image, the pad colour never does.
    copies = occluded_copies(pixels, rows, cols, tuple(bundle.pad_color))
    probabilities = np.asarray(await predict(copies), dtype=np.float64)
    if probabilities.shape[0] != len(copies):
        raise ValueError(f"predict answered {probabilities.shape[0]} rows for {len(copies)} images")
    kept = probabilities[:, class_index]  # the unmasked square's first: the same session, the same batches
    drops = np.clip(kept[0] - kept[1:], 0.0, None).reshape(len(rows) - 1, len(cols) - 1)
    return rows, cols, drops


async def occlusion_map(bundle: Bundle, pixels: np.ndarray, class_index: int, predict: Predict,
                        geometry: Geometry | None = None, grid: int = GRID) -> np.ndarray:
    """size x size float64 map: each patch's drop at its centre, linear in between, 0 on the padding."""
    rows, cols, drops = await occlusion_drops(bundle, pixels, class_index, predict, geometry, grid)
    return spread(drops, rows, cols, bundle.image_size)


async def attention_map(bundle: Bundle, pixels: np.ndarray, features: np.ndarray | None, class_index: int,
                        predict: Predict, geometry: Geometry | None = None) -> np.ndarray:
    """The 2-D attention map of ``class_index`` over the model's square, by ``method_of(bundle)``.

    ``pixels``: the S x S x 3 uint8 square the model saw. ``features``: its h x w x C features (CAM
    only, else None). ``predict``: N x S x S x 3 uint8 -> N x classes probabilities (occlusion
    only; called once, with all 1 + patches copies). ``geometry``: where the image sits in the
    square (occlusion hides only patches of the image, none of the padding; without it, the whole
    square is cut up).
    """
    if method_of(bundle) == "class_activation_map":
        if features is None:
            raise ValueError("the class activation map needs the image's features (predict with_features=True)")
        return bundle.class_activation_map(features, class_index)
    return await occlusion_map(bundle, pixels, class_index, predict, geometry)
