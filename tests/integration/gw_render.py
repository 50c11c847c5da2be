"""Reference renderings for the rendered-image tests, computed independently of the gateway: pixels
from pydicom's `pixel_array` (with the pylibjpeg / openjpeg / libjpeg decoders installed), the Modality
LUT from pydicom, the VOI window from the formulas of PS3.3 C.11.2.1.2 written out here, MONOCHROME1
inverted; colour as pydicom delivers it (RGB), palettes through pydicom's `apply_color_lut`."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut


def window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR, LINEAR_EXACT) and C.11.2.1.2.2 (SIGMOID), output 0..255."""
    x = x.astype(np.float64)
    c, w = float(center), float(width)
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if function == "LINEAR_EXACT":
        y = ((x - c) / w + 0.5) * 255.0
        return np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 255.0, y))
    if w == 1.0:
        return np.where(x <= c - 0.5, 0.0, 255.0)
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0
    return np.where(x <= c - 0.5 - (w - 1) / 2, 0.0, np.where(x > c - 0.5 + (w - 1) / 2, 255.0, y))


def _first(v):
    if v is None:
        return None
    try:
        return float(v[0]) if not isinstance(v, (str, bytes)) and hasattr(v, "__getitem__") else float(v)
    except (TypeError, ValueError):
        return None


def frame_pixels(ds: Dataset, frame: int) -> np.ndarray:
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[frame]
    return arr


def reference(ds: Dataset, frame: int = 0, win: tuple | None = None) -> np.ndarray:
    """The 8-bit rendering of `frame` (0-based): H x W (grey) or H x W x 3 (colour)."""
    arr = frame_pixels(ds, frame)
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        arr = arr.astype(np.int64)
        bits = int(ds.BitsStored)
        if bits > 8:
            arr = arr >> (bits - 8)
        return np.clip(arr, 0, 255).astype(np.uint8)
    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        if bits > 8:
            rgb = rgb.astype(np.int64) >> (bits - 8)
        return rgb.astype(np.uint8)
    modality = apply_modality_lut(arr, ds).astype(np.float64)
    if win is not None:
        y = window(modality, *win)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        fn = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        y = window(modality, _first(ds.WindowCenter), _first(ds.WindowWidth), fn)
    elif "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        n, first, bits = [int(v) for v in item.LUTDescriptor]
        n = n or 65536
        data = np.asarray(item.LUTData, dtype=np.float64)[:n]
        idx = np.clip(np.round(modality).astype(np.int64) - first, 0, n - 1)
        y = data[idx] / (2**bits - 1) * 255.0
    else:
        lo, hi = float(modality.min()), float(modality.max())
        w = max(hi - lo, 1.0)
        y = window(modality, lo + w / 2, w, "LINEAR_EXACT")
    out = np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)
    if pi == "MONOCHROME1":
        out = 255 - out
    return out


def decode_image(data: bytes) -> tuple[str, np.ndarray]:
    """(PIL format, pixels as H x W or H x W x 3 uint8)."""
    img = Image.open(io.BytesIO(data))
    fmt = img.format
    if img.mode == "L":
        return fmt, np.asarray(img)
    if img.mode == "P":
        rgb = np.asarray(img.convert("RGB"))
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return fmt, rgb[..., 0]
        return fmt, rgb
    return fmt, np.asarray(img.convert("RGB"))


def difference(got: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    """(mean absolute difference, largest absolute difference)."""
    assert got.shape == expected.shape, f"shape {got.shape} != {expected.shape}"
    d = np.abs(got.astype(np.int64) - expected.astype(np.int64))
    return float(d.mean()), int(d.max())


def fitted(width: int, height: int, vw: int | None, vh: int | None) -> tuple[int, int]:
    scale = min(s for s in (vw / width if vw else math.inf, vh / height if vh else math.inf))
    if scale == math.inf:
        scale = 1.0
    return max(1, math.floor(width * scale + 0.5)), max(1, math.floor(height * scale + 0.5))
