"""A user's own images, as a folder per class or a CSV manifest: the `folder` dataset (`vitshap_folder`).

Accepted as the manual directory (`config.dataset.manual_dir`), recognized in this order:
  * A `.csv` file (a manifest): a header with `path` and `label` columns (other columns are ignored)
    and optionally `split` (train, val, validation or test, on every row). Paths are relative to the
    CSV's folder (or absolute); listed files are decoded whatever their name. Class names are the
    sorted label strings; if every label is an integer, the labels are the class indices, which must
    be exactly 0..K-1, and the names are "0".."K-1".
  * A folder with split folders at the top (any top-level folder named train, val, validation or
    test, in any case, makes it one): `train/` plus any of `val/` (or `validation/`) and `test/`, and
    nothing else, each holding `<class>/<images>`. Class names are the union of the class folders of
    all splits, sorted; every class needs training images.
  * Any other folder: `<class>/<images>`, one folder per class (like torchvision's ImageFolder; images
    may lie deeper inside a class folder). Class names are the class folders' names, sorted (by code
    point, as torchvision sorts them: "Zebra" before "ant").
An image is any file whose extension (any case) Pillow reads: .jpg .jpeg .png .bmp .gif .webp .tif ...
Other files (README.txt, label files) are ignored and counted; hidden files, `._*` AppleDouble sidecars
and `__MACOSX/` are skipped unseen (`base.is_hidden`).

Splits: given split folders (or CSV `split` values) are used as they are. A split that is not given
is carved from `train` by a hash of each image's path (relative to the folder; in a CSV, as written):
`u = crc32(path) / 2**32`, and with `split_fractions` (train, validation, test; default 0.8, 0.1, 0.1)
the image goes to train if u < f_train, to validation if u < f_train + f_validation, else to test.
A training image whose hash names a given split stays in train. With no splits given (one folder per
class, or a CSV without `split`) this carves all three. The assignment depends only on each image's
path, so adding images never moves the others. Every split must end up with at least one image.

Each source is prepared under its own tfds config, `<slug of its name>-<8 hex of a hash of its real
path and the split fractions>`, so two folders never collide and the same folder is found again from
its path alone. A source that changed after preparing is not noticed: delete the prepared folder
(`builder.data_path`) to prepare it again. Next to the prepared data, `class_names.txt` lists the
class names in label order. Examples hold `image` (RGB, `base.to_rgb`), `label` and `file_name` (the
path above).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import os
import re
import zlib
from collections import Counter
from collections.abc import Sequence

import PIL.Image
import tensorflow_datasets as tfds
from absl import logging

from vitshap_jax.config import SPLITS
from vitshap_jax.data.base import DataNotFoundError, Files, ImageBuilder, LocalDatasetInfo, is_hidden
from vitshap_jax.files import absolute

SPLIT_FOLDERS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
DEFAULT_FRACTIONS = "0.8,0.1,0.1"
# Formats Pillow recognizes but cannot decode without other software, or that are not pictures.
NOT_IMAGES = ("BUFR", "EPS", "GRIB", "HDF5", "IPTC", "MPEG", "WMF")
INSTRUCTIONS = (
    "Give as manual_dir (config.dataset.manual_dir) a folder DIR/<class>/<images>, a folder "
    "DIR/{train,val,test}/<class>/<images>, or a CSV file with path,label columns (and optionally split)."
)


def parse_fractions(value: str | Sequence[float]) -> tuple[float, float, float]:
    """`"0.8,0.1,0.1"` (or three numbers) -> the train, validation and test fractions."""
    try:
        parts = value.split(",") if isinstance(value, str) else list(value)
        fractions = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        fractions = ()
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"split_fractions={value!r}: expected three fractions train,validation,test, each > 0, "
            "summing to 1, e.g. '0.8,0.1,0.1'"
        )
    return fractions


def hash_split(path: str, fractions: Sequence[float]) -> str:
    """The split that the hash of `path` falls into (see the module docstring)."""
    u = zlib.crc32(path.encode("utf-8")) / 2**32
    if u < fractions[0]:
        return "train"
    return "validation" if u < fractions[0] + fractions[1] else "test"


def carve(path: str, fractions: Sequence[float], given: set[str]) -> str:
    """Where a training image goes when the splits in `given` exist already."""
    split = hash_split(path, fractions)
    return "train" if split in given else split


@functools.cache
def image_extensions() -> frozenset[str]:
    """Lower-case extensions of the formats Pillow can read (".jpg", ".png", ".tif", ...)."""
    return frozenset(
        ext.lower()
        for ext, fmt in PIL.Image.registered_extensions().items()
        if fmt in PIL.Image.OPEN and fmt not in NOT_IMAGES
    )


def is_image(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in image_extensions()


def config_name(source: str, fractions: Sequence[float]) -> str:
    """`<slug>-<8 hex>`: the slug of the source's name, the hash of its real path and the fractions."""
    real = os.path.realpath(os.path.expanduser(os.fspath(source)))
    stem = os.path.basename(real.rstrip(os.sep))
    stem = os.path.splitext(stem)[0] if stem.lower().endswith(".csv") else stem
    slug = re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_")[:40] or "images"
    key = f"{real}|{','.join(repr(float(f)) for f in fractions)}"
    return f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
    """The tfds config of one source: its path and split fractions (the name comes from both)."""

    source: str = ""
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)


def make_config(source: str, split_fractions: str | Sequence[float] = DEFAULT_FRACTIONS) -> FolderConfig:
    source = absolute(source)
    fractions = parse_fractions(split_fractions)
    return FolderConfig(
        name=config_name(source, fractions),
        description=f"images from {source}",
        source=source,
        fractions=fractions,
    )


@dataclasses.dataclass
class Scan:
    """What a source holds: class names in label order, and per split `(path, label)` pairs, where
    `path` is relative to `root` (also the example's key and its `file_name`)."""

    root: str
    layout: str  # "classes", "splits" or "csv"
    class_names: list[str]
    splits: dict[str, list[tuple[str, int]]]
    ignored: int = 0  # files that are not images


def scan(source: str, fractions: Sequence[float]) -> Scan:
    """Finds the layout of `source`, its classes and every image's split; raises on anything unusable."""
    if not source or not os.path.exists(source):
        raise DataNotFoundError(f"folder: {source!r} does not exist. {INSTRUCTIONS}")
    if os.path.isfile(source):
        if not source.lower().endswith(".csv"):
            raise ValueError(f"folder: {source} is a file but not a .csv manifest. {INSTRUCTIONS}")
        return _scan_csv(source, fractions)
    files = list_files(source)
    images = [p for p in files if is_image(p)]
    ignored = len(files) - len(images)
    if not images:
        raise DataNotFoundError(
            f"folder: found no images in {source} ({_count(ignored, 'other file')}). {INSTRUCTIONS}"
        )
    _no_loose_images(source, images, "DIR/<class>/<images>")
    tops = _subfolders(source)
    splits = {t: SPLIT_FOLDERS[t.lower()] for t in tops if t.lower() in SPLIT_FOLDERS}
    if not splits:
        groups = {"": _by_class(source, "", images, tops)}
        layout = "classes"
    else:
        others = [t for t in tops if t not in splits]
        if others:
            raise ValueError(
                f"folder: {source} has split folders ({_names(splits)}) and other folders "
                f"({_names(others)}); with split folders, every top-level folder must be train, val, "
                "validation or test"
            )
        if "train" not in splits.values():
            raise ValueError(f"folder: {source} has split folders {_names(splits)} but no train/ folder")
        for split in sorted(set(splits.values())):
            same = [t for t, s in splits.items() if s == split]
            if len(same) > 1:
                folders = " and ".join(f"{t}/" for t in same)
                raise ValueError(f"folder: {source} has {folders} for the {split} split; keep one")
        groups = {}
        for top, split in splits.items():
            inside = [p[len(top) + 1 :] for p in images if p.startswith(top + "/")]
            if not inside:
                raise ValueError(
                    f"folder: {source}/{top} has no images; fill it with <class>/<images> or delete it "
                    f"to carve {split} from train"
                )
            _no_loose_images(os.path.join(source, top), inside, f"{top}/<class>/<images>")
            groups[split] = _by_class(source, top, inside, _subfolders(os.path.join(source, top)))
        layout = "splits"
        for split, classes in groups.items():
            missing = sorted(set(classes) - set(groups["train"]))
            if missing:
                raise ValueError(
                    f"folder: class folder(s) {_names(missing)} in {split} have no training images; "
                    f"every class needs a folder in train/ (train has {_names(sorted(groups['train']))})"
                )
    classes = groups["train"] if layout == "splits" else groups[""]
    names = sorted(classes)
    _at_least_two({c: len(classes[c]) for c in names}, source, "class folder")
    index = {name: i for i, name in enumerate(names)}
    rows = {
        split: [(p, index[c]) for c, paths in classes.items() for p in paths]
        for split, classes in groups.items()
    }
    return Scan(source, layout, names, _assign(rows, fractions, source), ignored)


def list_files(root: str) -> list[str]:
    """Every non-hidden file under `root` (posix paths relative to it), listed without reading any."""
    found = []

    def record(path):
        found.append(path)
        return False  # listed, not read

    for _ in Files(root).walk(record):
        pass
    return found


def _subfolders(folder: str) -> list[str]:
    return sorted(
        n for n in os.listdir(folder) if not is_hidden(n) and os.path.isdir(os.path.join(folder, n))
    )


def _no_loose_images(folder: str, images: list[str], expected: str):
    loose = [p for p in images if "/" not in p]
    if loose:
        raise ValueError(
            f"folder: found {_count(len(loose), 'image')} directly in {folder} (e.g. {loose[0]}); put each "
            f"image in a folder named after its class: {expected}"
        )


def _by_class(root: str, top: str, images: list[str], class_folders: list[str]) -> dict[str, list[str]]:
    """class -> image paths relative to `root` (`images` are relative to `root/top`)."""
    prefix = f"{top}/" if top else ""
    classes = {c: [] for c in class_folders}
    for p in images:
        classes[p.split("/", 1)[0]].append(prefix + p)
    empty = [c for c, paths in classes.items() if not paths]
    if empty:
        where = os.path.join(root, top) if top else root
        raise ValueError(
            f"folder: class folder(s) {_names(empty)} in {where} have no images; add images or delete "
            "the folder(s)"
        )
    return classes


def _at_least_two(counts: dict[str, int], source: str, what: str):
    """`counts`: images per class."""
    if len(counts) < 2:
        found = " ".join(f"{c!r} with {_count(n, 'image')}" for c, n in counts.items())
        raise ValueError(
            f"folder: found {_count(len(counts), what)} {found} in {source}; need at least 2 classes"
        )


def _assign(rows: dict[str, list[tuple[str, int]]], fractions, source: str) -> dict[str, list]:
    """Given splits as they are; `rows[""]` (no split given) or train carved into the missing ones."""
    given = {s for s in rows if s}
    out = {split: list(rows.get(split, [])) if split != "train" else [] for split in SPLITS}
    for path, label in rows.get("train", []) + rows.get("", []):
        out[carve(path, fractions, given)].append((path, label))
    total = sum(len(v) for v in out.values())
    for split, entries in out.items():
        if not entries:
            f = fractions[SPLITS.index(split)]
            raise ValueError(
                f"folder: the hash split put no image of {source} in {split} ({total} images, fraction "
                f"{f:g}); add images or raise its fraction (config.dataset.split_fractions)"
            )
    return out


def _scan_csv(path: str, fractions) -> Scan:
    root = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        if "path" not in header or "label" not in header:
            raise ValueError(
                f"folder: {path}: the header has columns {_names(header) or '(none)'}; need path and label "
                "(and optionally split)"
            )
        col = {name: header.index(name) for name in ("path", "label", "split") if name in header}
        rows, lines = [], {}
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            where = f"{path}, line {reader.line_num}"
            cells = {name: (row[i].strip() if i < len(row) else "") for name, i in col.items()}
            if not cells["path"] or not cells["label"]:
                raise ValueError(f"folder: {where}: empty path or label")
            if "\n" in cells["label"] or "\r" in cells["label"]:
                raise ValueError(f"folder: {where}: the label {cells['label']!r} spans several lines")
            split = ""
            if "split" in col:
                split = SPLIT_FOLDERS.get(cells["split"].lower(), "")
                if not split:
                    raise ValueError(
                        f"folder: {where}: split {cells['split']!r} is not train, val, validation or test"
                    )
            rel = cells["path"].replace("\\", "/")
            if rel in lines:
                raise ValueError(f"folder: {where}: {rel} is listed twice (also line {lines[rel]})")
            lines[rel] = reader.line_num
            rows.append((rel, cells["label"], split))
    if not rows:
        raise DataNotFoundError(f"folder: {path} lists no images. {INSTRUCTIONS}")
    missing = [rel for rel, _, _ in rows if not os.path.isfile(os.path.join(root, rel))]
    if missing:
        raise DataNotFoundError(
            f"folder: {path}: {_count(len(missing), 'listed file')} missing, e.g. "
            f"{os.path.join(root, missing[0])} (line {lines[missing[0]]}); paths are relative to the CSV's "
            "folder"
        )
    labels = sorted({label for _, label, _ in rows})
    if all(re.fullmatch(r"[+-]?\d+", label) for label in labels):
        ints = sorted({int(label) for label in labels})
        if ints != list(range(len(ints))):
            gaps = sorted(set(range(max(ints[-1] + 1, 0))) - set(ints))
            raise ValueError(
                f"folder: {path}: integer labels must be the class indices 0..K-1, found "
                f"{_names(map(str, ints))}" + (f" (missing {_names(map(str, gaps))})" if gaps else "")
            )
        names = [str(i) for i in ints]
        index = {label: int(label) for label in labels}
    else:
        names = labels
        index = {label: i for i, label in enumerate(names)}
    _at_least_two(Counter(label for _, label, _ in rows), path, "label")
    grouped: dict[str, list[tuple[str, int]]] = {}
    for rel, label, split in rows:
        grouped.setdefault(split, []).append((rel, index[label]))
    if "" not in grouped:  # a split column
        if "train" not in grouped:
            raise ValueError(f"folder: {path}: the split column names no train images")
        without = sorted(
            {names[i] for s in grouped for _, i in grouped[s]} - {names[i] for _, i in grouped["train"]}
        )
        if without:
            raise ValueError(f"folder: {path}: class(es) {_names(without)} have no training images")
    return Scan(root, "csv", names, _assign(grouped, fractions, path))


def _count(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _names(items) -> str:
    items = [f"'{i}'" for i in items]
    return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")


def keeps_pixels(data: bytes) -> bool:
    """Whether the encoded `data` can be stored as it is: an RGB JPEG without a rotation tag decodes to
    exactly the image that `decode_image` returns for it."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            return image.format == "JPEG" and image.mode == "RGB" and image.getexif().get(0x0112, 1) == 1
    except Exception:  # unreadable EXIF: store the decoded image
        return False


class Folder(ImageBuilder):
    """The images of one source (`manual_dir`), prepared under that source's own config.

    Args (besides `ImageBuilder`'s): manual_dir: the folder or CSV file; split_fractions: train,
    validation and test fractions for splits carved by hash ("0.8,0.1,0.1"). Or `config`, a
    `FolderConfig` (`make_config`), instead of both.
    """

    name = "vitshap_folder"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "class folders, split folders or a CSV manifest; missing splits by path hash."}

    def __init__(
        self,
        *,
        manual_dir: str | None = None,
        split_fractions: str | Sequence[float] = DEFAULT_FRACTIONS,
        config: FolderConfig | None = None,
        **kwargs,
    ):
        if config is None:
            if not manual_dir:
                raise DataNotFoundError(f"folder: no source given. {INSTRUCTIONS}")
            config = make_config(manual_dir, split_fractions)
        super().__init__(config=config, **kwargs)

    def _info(self):
        return LocalDatasetInfo(
            builder=self,
            description=f"Images from {self.builder_config.source}",
            features=tfds.features.FeaturesDict(
                {
                    # No fixed encoding: an RGB JPEG that decodes as stored is kept byte for byte (no
                    # second lossy compression, no growth); every other image is stored as PNG, which is
                    # lossless (PNG of a photo is several times its JPEG, so it is not used for those).
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    # Names are set from the source when it is prepared (`scan`).
                    "label": tfds.features.ClassLabel(),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        found = scan(self.builder_config.source, self.builder_config.fractions)
        sizes = ", ".join(f"{len(found.splits[s])} {s}" for s in SPLITS)
        logging.info(
            "folder: %s (%s layout): %d classes; %s; %d files that are not images ignored",
            self.builder_config.source,
            found.layout,
            len(found.class_names),
            sizes,
            found.ignored,
        )
        self.info.features["label"].names = found.class_names
        return {split: self._generate_examples(found, split) for split in SPLITS}

    def _generate_examples(self, found: Scan, split: str):
        labels = dict(found.splits[split])
        files = Files(found.root)
        if found.layout == "csv":  # listed paths, read as given (they need not lie under the CSV's folder)
            entries = ((rel, _read(os.path.join(found.root, rel))) for rel in labels)
        else:
            entries = files.walk(lambda rel: rel in labels)
        count = 0
        for rel, data in entries:
            image = self.decode_image(data, files.where(rel))
            if image is None:
                continue
            count += 1
            yield (
                rel,
                {"image": data if keeps_pixels(data) else image, "label": labels[rel], "file_name": rel},
            )
        if count == 0:
            raise ValueError(f"folder: every image of the {split} split of {found.root} was unreadable")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
