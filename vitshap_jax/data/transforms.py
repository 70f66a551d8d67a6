"""Image transforms on the host (numpy + Pillow), per example, deterministic given an rng.

Train: random-resized-crop (area fraction in [crop_scale_min, 1], aspect ratio in [3/4, 4/3]) to
`size` x `size`, then a horizontal flip with probability 1/2 where it makes sense. Eval: resize the shorter
side to `resize_size`, then center-crop `size` x `size`. Both end with the normalization the pretrained
ViT was trained with.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image

from vitshap_jax.config import NORMALIZATION_STATS


def normalization_of(config) -> str:
    """`config.dataset.normalization`, where "auto" means inception for a model without a checkpoint; a
    checkpoint's "auto" is resolved by the run (`stages.common.resolve`), which must come first."""
    kind = config.dataset.normalization
    if kind != "auto":
        return kind
    if config.model.get("pretrained") or config.model.get("from_checkpoint"):
        raise ValueError(
            "config.dataset.normalization='auto' with a pretrained checkpoint: call "
            "vitshap_jax.stages.common.resolve(config) first (the stages do), or name the normalization"
        )
    return "inception"


def normalize(image: np.ndarray, kind: str) -> np.ndarray:
    """uint8 `[H, W, 3]` -> float32, normalized per channel."""
    if kind not in NORMALIZATION_STATS:
        raise ValueError(
            f"normalization {kind!r}: expected one of {', '.join(NORMALIZATION_STATS)} (resolve 'auto' first)"
        )
    mean, std = NORMALIZATION_STATS[kind]
    return ((image.astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std)).astype(np.float32)


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(PIL.Image.fromarray(image).resize((width, height), PIL.Image.BILINEAR))


def random_resized_crop_box(
    height: int, width: int, rng: np.random.Generator, scale: tuple[float, float], ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width): random area fraction in `scale` and aspect ratio in `ratio`;
    after 10 failed tries, the largest centered crop within `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def random_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    width: int,
    height: int,
    *,
    crop_scale_min: float,
    hflip: bool,
) -> np.ndarray:
    """uint8 `[H, W, 3]` -> uint8 `[height, width, 3]`: a random-resized-crop (none when `crop_scale_min`
    is 1), then a horizontal flip with probability 1/2 where `hflip`."""
    if crop_scale_min < 1.0:
        top, left, h, w = random_resized_crop_box(*image.shape[:2], rng, (crop_scale_min, 1.0))
        image = image[top : top + h, left : left + w]
    image = _resize(image, width, height)
    if hflip and rng.random() < 0.5:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


def train_transform(
    image: np.ndarray, rng: np.random.Generator, *, size: int, crop_scale_min: float, hflip: bool, norm: str
) -> np.ndarray:
    """uint8 `[H, W, 3]` -> float32 `[size, size, 3]`, randomly cropped (and flipped)."""
    return normalize(random_crop(image, rng, size, size, crop_scale_min=crop_scale_min, hflip=hflip), norm)


def eval_crop(image: np.ndarray, *, size: int, resize_size: int) -> np.ndarray:
    """uint8 `[H, W, 3]` -> uint8 `[size, size, 3]`: shorter side to `resize_size`, center crop."""
    h, w = image.shape[:2]
    scale = resize_size / min(h, w)
    image = _resize(image, max(resize_size, round(w * scale)), max(resize_size, round(h * scale)))
    h, w = image.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return image[top : top + size, left : left + size]


def eval_transform(image: np.ndarray, *, size: int, resize_size: int, norm: str) -> np.ndarray:
    """uint8 `[H, W, 3]` -> float32 `[size, size, 3]`: `eval_crop`, then `normalize`."""
    return normalize(eval_crop(image, size=size, resize_size=resize_size), norm)
