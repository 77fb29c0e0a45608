"""The one definition of a VPR backbone's preprocessing, shared by the ground and the drone.

Provisioning (``navcache.descriptors``) turns every orthophoto chunk into the backbone's input with
:class:`Preprocess`; the signed manifest records the same object (:meth:`Preprocess.to_signed`, integers and
strings only); the drone's ``open_cache(...).preprocess`` rebuilds it from the verified manifest
(:meth:`Preprocess.from_signed`) and calls the same code on camera frames. There is no second copy of the
arithmetic to drift.

A frame goes through, in this order:

1. **resize** to ``height`` x ``width`` with Pillow's bilinear filter (antialiased when downscaling; a numpy
   port of Pillow's 8-bit algorithm where Pillow is absent): ``squash`` stretches the whole frame to the
   input size (the aspect ratio changes), ``center_crop`` cuts the largest centred region with the input's
   aspect ratio first, ``pad`` first extends the frame with black (0, 0, 0) borders, centred, to that ratio.
2. **channels**: ``RGB`` keeps the order, ``BGR`` reverses it. ``mean`` and ``std`` are in the order the
   model receives the channels.
3. **scale** and normalise: ``unit`` feeds ``(v / 255 - mean) / std``, ``byte`` feeds ``(v - mean) / std``
   for each 8-bit level ``v`` (float32 arithmetic; a 256-entry table per channel gives bit-identical values).
4. **layout**: ``NCHW`` gives (3, H, W) per image, ``NHWC`` gives (H, W, 3).

Defaults (what a backbone gets when its sortie declares nothing): squash, ImageNet mean/std on the unit scale,
RGB, NCHW. With ``scale = "byte"`` the default mean/std are ImageNet's times 255.

Signed form (no floats in signed data): mean and std as integers x 10^6 (``mean_e6``, ``std_e6``). Values
are held at that precision from the start (:func:`quantise_e6`), so the ground never uses a digit the drone
cannot read back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from functools import cached_property
from typing import Any

import numpy as np

from .errors import InferenceError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_MEAN_BYTE = (123.675, 116.28, 103.53)
IMAGENET_STD_BYTE = (58.395, 57.12, 57.375)

RESIZE_MODES = ("squash", "center_crop", "pad")
SCALES = ("unit", "byte")
CHANNEL_ORDERS = ("RGB", "BGR")
LAYOUTS = ("NCHW", "NHWC")

E6 = 1_000_000
#: Largest |mean| and std accepted (x 10^6 they stay far inside JSON's exact integer range).
MAX_ABS_VALUE = 1e6
_SIGNED_KEYS = frozenset({"resize", "mean_e6", "std_e6", "scale", "channels", "layout", "height", "width"})
_MAX_SIDE = 1 << 16


def quantise_e6(value: float) -> int:
    """``value`` x 10^6 as an integer, rounded half-even from its shortest decimal form."""
    try:
        return int((Decimal(repr(float(value))) * E6).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
    except (InvalidOperation, ValueError, OverflowError):
        raise ValueError(f"{value!r} is not a finite number") from None


def _triple(values: Sequence[float], what: str) -> tuple[float, float, float]:
    if isinstance(values, str) or len(values) != 3:
        raise ValueError(f"{what} must have 3 values (one per channel), got {list(values)!r}")
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
            raise ValueError(f"{what} must be finite numbers, got {list(values)!r}")
        if abs(value) > MAX_ABS_VALUE:
            raise ValueError(f"{what} values must lie within +-{MAX_ABS_VALUE:g}, got {list(values)!r}")
        out.append(quantise_e6(value) / E6)
    return out[0], out[1], out[2]


@dataclass(frozen=True)
class Preprocess:
    """RGB uint8 (H, W, 3) frame → float32 input of one image for the backbone (see the module docstring).

    ``mean``/``std`` default to ImageNet's on the chosen scale and are quantised to 10^-6."""

    height: int
    width: int
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    resize: str = "squash"
    scale: str = "unit"
    channels: str = "RGB"
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("resize", self.resize, RESIZE_MODES),
            ("scale", self.scale, SCALES),
            ("channels", self.channels, CHANNEL_ORDERS),
            ("layout", self.layout, LAYOUTS),
        ):
            if value not in choices:
                raise ValueError(f"{name} {value!r} is not one of: {', '.join(choices)}")
        for name in ("height", "width"):
            side = getattr(self, name)
            if isinstance(side, bool) or not isinstance(side, int) or not 1 <= side <= _MAX_SIDE:
                raise ValueError(f"{name} must be an integer from 1 to {_MAX_SIDE}, got {side!r}")
        byte = self.scale == "byte"
        mean = self.mean if self.mean is not None else (IMAGENET_MEAN_BYTE if byte else IMAGENET_MEAN)
        std = self.std if self.std is not None else (IMAGENET_STD_BYTE if byte else IMAGENET_STD)
        object.__setattr__(self, "mean", _triple(mean, "mean"))
        std_t = _triple(std, "std")
        if min(std_t) <= 0:
            raise ValueError(f"std must be positive, got {list(std)!r}")
        object.__setattr__(self, "std", std_t)

    # -- construction -------------------------------------------------------------------------------------

    @classmethod
    def for_input_shape(cls, shape: Sequence[int], **options: Any) -> Preprocess:
        """From the backbone's input shape (N, 3, H, W) or, with ``layout="NHWC"``, (N, H, W, 3)."""
        layout = options.get("layout", "NCHW")
        channel_axis = 3 if layout == "NHWC" else 1
        if len(shape) != 4 or shape[channel_axis] != 3:
            want = "[N, H, W, 3]" if layout == "NHWC" else "[N, 3, H, W]"
            raise InferenceError(
                f"the VPR backbone input must be {layout} with 3 channels {want}, got shape {list(shape)}",
                hint="give the model's image input shape, and declare layout = 'NHWC' for channels-last models",
            )
        height, width = (shape[1], shape[2]) if layout == "NHWC" else (shape[2], shape[3])
        return cls(int(height), int(width), **options)

    @property
    def is_default(self) -> bool:
        """Only the input size differs from navcache's original preprocessing."""
        return self == Preprocess(self.height, self.width)

    def input_shape(self, batch: int) -> tuple[int, int, int, int]:
        if self.layout == "NHWC":
            return (batch, self.height, self.width, 3)
        return (batch, 3, self.height, self.width)

    def spec(self) -> str:
        """Everything that changes the tensors the engine sees; part of every descriptor shard key. Option
        fields appear only when an option differs from the default, so the default's key text names the size,
        mean and std alone and shards computed with it keep their keys."""
        base = f"v1|rgb|bilinear|{self.height}x{self.width}|mean={self.mean}|std={self.std}"
        if self.resize == "squash" and self.scale == "unit" and self.channels == "RGB" and self.layout == "NCHW":
            return base
        return f"{base}|resize={self.resize}|scale={self.scale}|channels={self.channels}|layout={self.layout}"

    # -- signed form ----------------------------------------------------------------------------------------

    def to_signed(self) -> dict[str, Any]:
        """Integers and strings only, for the manifest predicate."""
        assert self.mean is not None and self.std is not None
        return {
            "resize": self.resize,
            "mean_e6": [quantise_e6(v) for v in self.mean],
            "std_e6": [quantise_e6(v) for v in self.std],
            "scale": self.scale,
            "channels": self.channels,
            "layout": self.layout,
            "height": self.height,
            "width": self.width,
        }

    @classmethod
    def from_signed(cls, block: object) -> Preprocess:
        """The inverse of :meth:`to_signed`; ValueError naming the problem for anything else."""
        if not isinstance(block, Mapping):
            raise ValueError("must be an object")
        missing = sorted(_SIGNED_KEYS - set(block))
        if missing:
            raise ValueError(f"missing field(s) {', '.join(missing)}")
        values: dict[str, Any] = {}
        for key in ("mean_e6", "std_e6"):
            raw = block[key]
            if not isinstance(raw, list) or len(raw) != 3 or not all(_is_int(v) for v in raw):
                raise ValueError(f"{key} must be 3 integers (value x 10^6)")
            if any(abs(v) > MAX_ABS_VALUE * E6 for v in raw):
                raise ValueError(f"{key} values must lie within +-{MAX_ABS_VALUE * E6:.0f}")
            values[key[:-3]] = tuple(v / E6 for v in raw)
        for key in ("resize", "scale", "channels", "layout"):
            if not isinstance(block[key], str):
                raise ValueError(f"{key} must be a string")
            values[key] = block[key]
        for key in ("height", "width"):
            if not _is_int(block[key]):
                raise ValueError(f"{key} must be an integer")
            values[key] = block[key]
        return cls(**values)

    # -- arithmetic -----------------------------------------------------------------------------------------

    @cached_property
    def _lut(self) -> np.ndarray:
        """(3, 256) float32, row c = the value of every 8-bit level in model channel c, computed with the
        same float32 operations as :meth:`formula`, so the table lookup is bit-identical to it."""
        levels = np.arange(256, dtype=np.float32)[:, None]
        scaled = levels * np.float32(1.0 / 255.0) if self.scale == "unit" else levels
        normalised = (scaled - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(normalised.T, dtype=np.float32)

    def _source_channels(self) -> tuple[int, int, int]:
        return (2, 1, 0) if self.channels == "BGR" else (0, 1, 2)

    def resized(self, rgb: np.ndarray, *, use_pil: bool | None = None) -> np.ndarray:
        """Step 1 only: the (height, width, 3) uint8 frame the normalisation sees."""
        image = _check_rgb(rgb)
        h, w = image.shape[:2]
        if self.resize == "center_crop":
            if w * self.height > h * self.width:  # wider than the input: crop left and right
                cw = max(1, (h * self.width + self.height // 2) // self.height)
                x0 = (w - cw) // 2
                image = image[:, x0 : x0 + cw]
            elif w * self.height < h * self.width:
                ch = max(1, (w * self.height + self.width // 2) // self.width)
                y0 = (h - ch) // 2
                image = image[y0 : y0 + ch]
        elif self.resize == "pad":
            if w * self.height > h * self.width:
                ph = (w * self.height + self.width // 2) // self.width
                canvas = np.zeros((ph, w, 3), np.uint8)
                y0 = (ph - h) // 2
                canvas[y0 : y0 + h] = image
                image = canvas
            elif w * self.height < h * self.width:
                pw = (h * self.width + self.height // 2) // self.height
                canvas = np.zeros((h, pw, 3), np.uint8)
                x0 = (pw - w) // 2
                canvas[:, x0 : x0 + w] = image
                image = canvas
        if image.shape[:2] != (self.height, self.width):
            image = resize_bilinear(np.ascontiguousarray(image), self.height, self.width, use_pil)
        return image

    def __call__(self, rgb: np.ndarray, out: np.ndarray | None = None, *, use_pil: bool | None = None) -> np.ndarray:
        """The float32 input of one image ((3, H, W) or (H, W, 3) by layout), written into ``out`` when
        given (e.g. a row of a preallocated batch)."""
        return self.normalise(self.resized(rgb, use_pil=use_pil), out)

    def normalise(self, image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Steps 2-4 on a frame that :meth:`resized` made (``height`` x ``width`` RGB uint8): one table
        lookup per channel, written straight into ``out`` when given. Splitting here lets a pipeline resize
        on worker threads and fill a preallocated float32 batch in place, with no per-image float copy."""
        image = _check_rgb(image)
        if image.shape[:2] != (self.height, self.width):
            raise InferenceError(
                f"normalise expects a {self.height}x{self.width} frame, got {image.shape[0]}x{image.shape[1]}",
                hint="resize it first (Preprocess.resized), or call the Preprocess itself on the camera frame",
            )
        shape = self.input_shape(1)[1:]
        if out is None:
            out = np.empty(shape, np.float32)
        elif out.shape != shape or out.dtype != np.float32:
            raise InferenceError(f"out must be float32 {shape}, got {out.dtype} {out.shape}")
        lut = self._lut
        for channel, source in enumerate(self._source_channels()):
            if self.layout == "NCHW":
                np.take(lut[channel], image[..., source], out=out[channel])
            else:
                out[..., channel] = lut[channel][image[..., source]]
        return out

    def formula(self, rgb: np.ndarray, *, use_pil: bool | None = None) -> np.ndarray:
        """The per-pixel arithmetic the table encodes (a reference for tests; slower)."""
        image = self.resized(rgb, use_pil=use_pil)[..., list(self._source_channels())]
        values = image.astype(np.float32)
        if self.scale == "unit":
            values = values * np.float32(1.0 / 255.0)
        normalised = (values - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout == "NCHW":
            normalised = normalised.transpose(2, 0, 1)
        return np.ascontiguousarray(normalised, dtype=np.float32)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    image = np.asarray(rgb)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InferenceError(
            f"preprocess expects an RGB uint8 (H, W, 3) image, got {image.dtype} with shape {image.shape}",
            hint="convert the camera frame to 8-bit RGB first",
        )
    return image


# --------------------------------------------------------------------------------------------------------
# Resizing: Pillow's bilinear filter, or a numpy port of it for a drone without Pillow


def resize_bilinear(image: np.ndarray, height: int, width: int, use_pil: bool | None = None) -> np.ndarray:
    """Pillow's bilinear resize of an RGB uint8 image. ``use_pil=None`` uses Pillow when it imports and
    otherwise a numpy port of the same 8-bit fixed-point algorithm (horizontal pass, then vertical, as
    Pillow's C code): byte-identical for the demo's 256 → 128 px tiles; for some other size pairs Pillow 13
    runs the vertical pass first and a few pixels then differ by one grey level."""
    if use_pil is not False:
        try:
            from PIL import Image
        except ImportError:
            if use_pil:
                raise
        else:
            return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
    out = image
    if out.shape[1] != width:
        out = _resample_axis(out, width, axis=1)
    if out.shape[0] != height:
        out = _resample_axis(out, height, axis=0)
    return out


_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit images


def _bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's ``precompute_coeffs`` for the bilinear (triangle) filter, normalised and in fixed point."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)  # downscaling widens the filter (antialiasing)
    support = filterscale
    weights = np.zeros((out_size, in_size), dtype=np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        pos = (np.arange(xmin, xmax) - center + 0.5) / filterscale
        k = np.clip(1.0 - np.abs(pos), 0.0, None)
        total = k.sum()
        if total:
            k = k / total
        fixed = k * (1 << _PRECISION_BITS)
        weights[xx, xmin:xmax] = np.where(fixed < 0, np.trunc(fixed - 0.5), np.trunc(fixed + 0.5)).astype(np.int64)
    return weights


def _resample_axis(image: np.ndarray, size: int, axis: int) -> np.ndarray:
    weights = _bilinear_weights(image.shape[axis], size)
    pixels = image.astype(np.int64)
    spec = "ow,hwc->hoc" if axis == 1 else "oh,hwc->owc"
    acc = np.einsum(spec, weights, pixels)
    acc = (acc + (1 << (_PRECISION_BITS - 1))) >> _PRECISION_BITS
    return np.clip(acc, 0, 255).astype(np.uint8)


__all__ = [
    "CHANNEL_ORDERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LAYOUTS",
    "RESIZE_MODES",
    "SCALES",
    "Preprocess",
    "quantise_e6",
    "resize_bilinear",
]
