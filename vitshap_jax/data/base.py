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

import PIL.Image
import tensorflow_datasets as tfds
from absl import logging

BAD_IMAGE_POLICIES = ("fail", "skip")


class DataNotFoundError(FileNotFoundError):
    """The user's download is not where the builder looks; the message says what to put where."""


class BadImageError(ValueError):
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
        """Decodes to RGB (grayscale, palette, CMYK and alpha images included); None if skipped."""
        try:
            with PIL.Image.open(io.BytesIO(data)) as image:
                image.load()
                return image.convert("RGB")
        except Exception as e:  # PIL raises many kinds for bad files
            if self.on_bad_image == "fail":
                raise BadImageError(
                    f"{where}: cannot read the image ({type(e).__name__}: {e}). Replace or delete the file, "
                    "or prepare with on_bad_image='skip' (config.dataset.on_bad_image=skip) to leave it out"
                ) from None
            logging.warning("skipping unreadable image %s (%s: %s)", where, type(e).__name__, e)
            self.skipped.append(where)
            return None
