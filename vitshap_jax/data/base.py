"""What the dataset builders share: reading a user's download (folder or archive), decoding images
with a policy for unreadable ones, and the errors that say what is missing where.

Builders prepare into ArrayRecord with tensorflow-datasets and need no TensorFlow: images are handed
to tfds as PIL images (never numpy arrays), archives are read with `tarfile`/`zipfile`
(never `dl_manager.extract`), and the file format is always array_record.
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections.abc import Callable, Iterator

import numpy as np
import PIL.Image
import PIL.ImageOps
import tensorflow_datasets as tfds
from absl import logging

from vitshap_jax.config import BAD_IMAGE_POLICIES
from vitshap_jax.errors import UserError

ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# Where an image is transparent it is shown over this colour, as a browser or document shows it.
ALPHA_BACKGROUND = (255, 255, 255)


class DataNotFoundError(UserError, FileNotFoundError):
    """The user's download is not where the builder looks; the message says what to put where."""


class BadImageError(UserError, ValueError):
    """An image file cannot be decoded; the message names it."""


def is_hidden(rel: str) -> bool:
    """Not data: a hidden file or folder anywhere in the path (`.DS_Store`, macOS `._*` AppleDouble
    sidecars, `.ipynb_checkpoints/`, ...) or the `__MACOSX/` folder a Mac writes into zip archives."""
    return any(
        part.startswith(".") or part == "__MACOSX" for part in rel.replace(os.sep, "/").split("/") if part
    )


def is_empty_dir(path: str) -> bool:
    """A folder with nothing in it but hidden files (as `is_hidden` means it)."""
    return os.path.isdir(path) and all(is_hidden(name) for name in os.listdir(path))


class Files:
    """The files of a download: an extracted folder, a .tar(.gz)/.tgz archive or a .zip archive.

    Paths are posix paths relative to the folder or archive root, e.g. `imagenette2/train/n01440764/x.JPEG`.
    Hidden files and folders (`is_hidden`: `.DS_Store`, `._*` sidecars, `__MACOSX/`) are never listed.
    Tar archives are read sequentially (random access into a gzip stream is quadratic), so use `walk`;
    `read` works on folders and zip archives.
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.kind = "dir" if os.path.isdir(self.path) else "zip" if self.path.endswith(".zip") else "tar"

    def walk(self, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
        """Yields `(path, bytes)` of every file for which `wanted(path)`, in a fixed order."""
        if self.kind == "dir":
            for root, dirs, files in os.walk(self.path):
                dirs[:] = sorted(d for d in dirs if not is_hidden(d))
                for name in sorted(files):
                    rel = os.path.relpath(os.path.join(root, name), self.path).replace(os.sep, "/")
                    if not is_hidden(rel) and wanted(rel):
                        with open(os.path.join(root, name), "rb") as f:
                            yield rel, f.read()
        elif self.kind == "zip":
            with zipfile.ZipFile(self.path) as zf:
                for name in sorted(zf.namelist()):
                    if not name.endswith("/") and not is_hidden(name) and wanted(name):
                        yield name, zf.read(name)
        else:
            with tarfile.open(self.path) as tf:
                for member in tf:
                    rel = member.name.removeprefix("./")
                    if member.isfile() and not is_hidden(rel) and wanted(rel):
                        yield rel, tf.extractfile(member).read()

    def read(self, rel: str) -> bytes:
        if self.kind == "dir":
            with open(os.path.join(self.path, *rel.split("/")), "rb") as f:
                return f.read()
        if self.kind == "zip":
            with zipfile.ZipFile(self.path) as zf:
                return zf.read(rel)
        raise ValueError(f"{self.path}: random access into a tar archive is not supported; use walk()")

    def where(self, rel: str) -> str:
        """A path a person can find: `folder/rel` or `archive.tgz:rel`."""
        return os.path.join(self.path, rel) if self.kind == "dir" else f"{self.path}:{rel}"


def find_download(manual_dir: str, candidates: list[str], dataset: str, instructions: str) -> str:
    """The first of `candidates` (names relative to `manual_dir`) that exists (a folder: with something in it
    besides hidden files), or a DataNotFoundError."""
    manual_dir = os.path.expanduser(os.fspath(manual_dir)) if manual_dir else ""
    for name in candidates:
        path = os.path.join(manual_dir, name)
        if os.path.exists(path) and not is_empty_dir(path):
            return path
    expected = " or ".join(os.path.join(manual_dir or "<manual_dir>", c) for c in candidates)
    raise DataNotFoundError(f"{dataset}: expected {expected}. {instructions}")


class LocalDatasetInfo(tfds.core.DatasetInfo):
    """tfds's DatasetInfo for a dataset prepared from local files only. tfds looks up published
    metadata on GCS for a builder whose folder is not prepared yet, and leaves an empty temporary
    folder (`/tmp/tmp*tfds`) behind even when GCS is off, as it is here: one per builder made."""

    def initialize_from_bucket(self) -> None:
        pass  # nothing of ours is published there


class ImageBuilder(tfds.core.GeneratorBasedBuilder):
    """A builder of an image dataset from a user's local download.

    Args (besides tfds's `data_dir`):
      on_bad_image: "fail" (default) stops with the path of an unreadable image; "skip" leaves it out,
        logs it, and counts it in `skipped` (also written next to the prepared data by `data.prepare`).
    """

    def __init__(self, *, on_bad_image: str = "fail", **kwargs):
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image={on_bad_image!r}: must be one of {', '.join(BAD_IMAGE_POLICIES)}")
        self.on_bad_image = on_bad_image
        self.skipped: list[str] = []
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def decode_image(self, data: bytes, where: str) -> PIL.Image.Image | None:
        """Decodes to upright RGB (`to_rgb`, after the EXIF orientation); None if skipped."""
        try:
            with PIL.Image.open(io.BytesIO(data)) as image:
                image.load()
                return to_rgb(upright(image, where))
        except Exception as e:  # PIL raises many kinds for bad files
            if self.on_bad_image == "fail":
                raise BadImageError(
                    f"{where}: cannot read the image ({type(e).__name__}: {e}). Replace or delete the file, "
                    "or prepare with on_bad_image='skip' (config.dataset.on_bad_image=skip) to leave it out"
                ) from None
            logging.warning("skipping unreadable image %s (%s: %s)", where, type(e).__name__, e)
            self.skipped.append(where)
            return None


def upright(image: PIL.Image.Image, where: str = "") -> PIL.Image.Image:
    """The image turned as its EXIF orientation tag says (phones store photos sideways plus a tag).

    A broken EXIF block is not a broken image: it is logged and the image kept as stored.
    """
    try:
        return PIL.ImageOps.exif_transpose(image)
    except Exception as e:  # Pillow raises several kinds on malformed EXIF data
        logging.warning("%s: ignoring unreadable EXIF orientation (%s: %s)", where, type(e).__name__, e)
        return image.copy()  # a copy: the caller closes the file behind `image`


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """An 8-bit RGB image showing what `image` shows, whatever its mode.

    8-bit modes convert as Pillow does (grayscale replicated, palette looked up, CMYK as Pillow converts
    it), except that transparency is resolved by compositing over `ALPHA_BACKGROUND` rather than dropped
    (dropping it would reveal whatever colour a transparent pixel happens to store). Pillow's own
    conversion clips the high-bit-depth modes at 255 (a 16-bit image comes out almost all white), so
    they are scaled instead (`high_depth_to_uint8`).
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":  # I, I;16, I;16B, I;16L, I;16N, I;16S, F
        return PIL.Image.fromarray(high_depth_to_uint8(np.asarray(image))).convert("RGB")
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def read_image(path: str) -> np.ndarray:
    """Any image file Pillow reads, in any mode -> uint8 RGB `[H, W, 3]`, decoded as the datasets decode
    it (`to_rgb`: EXIF orientation applied, transparency over white, 16-bit and float images scaled to
    0..255, never clipped)."""
    with PIL.Image.open(path) as image:
        image.load()
        return np.asarray(to_rgb(upright(image, path)))


def high_depth_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """`pixels: [H, W]` of a 16-bit, 32-bit integer or float image -> uint8 `[H, W]`.

    Integers within 0..65535 (16-bit images; Pillow also opens some of them as 32-bit mode "I") are
    scaled so that 65535 -> 255, i.e. v / 257 rounded half up. Floats within [0, 1] are scaled by 255.
    Anything else (negative or larger values) is stretched linearly from its own minimum and maximum
    to 0..255; NaN becomes 0.
    """
    if pixels.dtype.kind == "f":
        x = np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if x.size == 0 or (x.min() >= 0 and x.max() <= 1):
            return np.round(x * 255).astype(np.uint8)
    else:
        x = pixels.astype(np.int64)
        if x.size == 0 or (x.min() >= 0 and x.max() <= 65535):
            return ((x * 255 + 32767) // 65535).astype(np.uint8)
    low, high = x.min(), x.max()
    if high == low:
        return np.zeros(x.shape, np.uint8)
    return np.round((x - low) * (255 / (high - low))).astype(np.uint8)
