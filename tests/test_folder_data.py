"""The `folder` dataset (a user's own images: class folders, split folders or a CSV manifest) and the
decoding of unusual images, on tiny trees written here."""

import io
import os
import shutil
import types
import zlib

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import pytest
from ml_collections import config_dict

from tests.helpers import write_files
from vitshap_jax import data
from vitshap_jax.data import folder
from vitshap_jax.data.base import BadImageError, DataNotFoundError, ImageBuilder, to_rgb

SIZE = (6, 5)  # width, height
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "  # a `._*` sidecar: not an image


def _encode(image: PIL.Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _image(value: int, fmt="PNG") -> bytes:
    """A flat RGB image whose pixels are all (value, value + 1, value + 2)."""
    return _encode(PIL.Image.new("RGB", SIZE, (value, value + 1, value + 2)), fmt)


def _records(builder):
    """file_name -> (split, record) over all splits."""
    out = {}
    for split in data.SPLITS:
        source = builder.as_data_source(split=split)
        for i in range(len(source)):
            out[source[i]["file_name"].decode()] = (split, source[i])
    return out


def _config(manual_dir, data_dir, num_classes, **extra):
    """A stage config's dataset part, as configs/ build it (without split_fractions unless given)."""
    dataset = dict(
        name="folder",
        manual_dir=str(manual_dir),
        data_dir=str(data_dir),
        on_bad_image="fail",
        num_classes=num_classes,
        **extra,
    )
    return config_dict.ConfigDict({"dataset": dataset})


# ---- layout (a): one folder per class


def _class_tree(root):
    """3 classes of flat PNG/JPEG images in every extension case, some nested; plus files that are
    not images, and the junk a Mac leaves. Returns {image path: (class, pixel value)}."""
    exts = [".png", ".PNG", ".jpg", ".JPEG", ".bmp", ".webp", ".tif", ".Tiff", ".gif"]
    images, files = {}, {}
    for c, name in enumerate(["zebra", "cat", "Dog"]):  # sorted: Dog, cat, zebra
        for i in range(10):
            ext = exts[(c + i) % len(exts)]
            fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}.get(ext.lower())
            fmt = fmt or ext[1:].upper()
            rel = f"{name}/{'deeper/down/' if i % 4 == 0 else ''}{name}{i}{ext}"
            value = 20 * c + 2 * i
            files[rel] = _image(value, fmt)
            images[rel] = (name, value)
            folder_, base = rel.rsplit("/", 1)
            files[f"{folder_}/._{base}"] = APPLEDOUBLE
    files |= {
        "README.txt": "my images",
        "cat/labels.csv": "a,b\n",
        "cat/notes": "no extension",
        ".DS_Store": b"\x00\x00\x00\x01Bud1",
        "Dog/.DS_Store": b"\x00\x00\x00\x01Bud1",
        "__MACOSX/cat/._cat1.png": APPLEDOUBLE,
        ".thumbnails/cat/x.png": b"not an image",
        "zebra/.hidden.png": b"not an image",
    }
    write_files(root, files)
    return images


def test_class_folders_hash_split_names_and_reuse(tmp_path, monkeypatch):
    manual, prepared = tmp_path / "My Photos", tmp_path / "prepared"
    images = _class_tree(manual)
    expected = {rel: folder.hash_split(rel, (0.8, 0.1, 0.1)) for rel in images}
    assert set(expected.values()) == set(data.SPLITS)  # the miniature fills every split
    # Strict policy: a sidecar or hidden file decoded as an image would stop the preparation.
    b = data.prepare("folder", str(manual), str(prepared))
    assert b.info.features["label"].names == ["Dog", "cat", "zebra"]
    with open(os.path.join(b.data_path, data.CLASS_NAMES_FILE)) as f:
        assert f.read() == "Dog\ncat\nzebra\n"
    assert os.path.basename(os.path.dirname(b.data_path)).startswith("my_photos-")
    records = _records(b)
    assert set(records) == set(images)  # every image once; nothing else
    for rel, (split, r) in records.items():
        name, value = images[rel]
        assert split == expected[rel]
        assert b.info.features["label"].names[r["label"]] == name
        assert r["image"].shape == (5, 6, 3) and r["image"].dtype == np.uint8
        tolerance = 3 if rel.lower().endswith((".jpg", ".jpeg", ".webp")) else 0  # lossy formats
        assert np.abs(r["image"].astype(int) - [value, value + 1, value + 2]).max() <= tolerance, rel
    for split in data.SPLITS:
        assert b.info.splits[split].num_examples == sum(s == split for s in expected.values())

    # The same folder, however spelled, is the same prepared copy; open_split finds it from the path.
    def no_rebuild(self, dl_manager):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(folder.Folder, "_split_generators", no_rebuild)
    monkeypatch.chdir(tmp_path)
    os.symlink(manual, tmp_path / "link")
    for spelling in ("My Photos/", "link", str(manual)):
        assert data.prepare("folder", spelling, str(prepared)).data_path == b.data_path
    config = _config(manual, prepared, num_classes=3)
    assert len(data.open_split(config, "test")) == b.info.splits["test"].num_examples
    assert data.dataset_classes(config) == ["Dog", "cat", "zebra"]
    config.dataset.num_classes = 2
    with pytest.raises(ValueError, match=r"num_classes=2 but the prepared folder data .* has 3 classes"):
        data.open_split(config, "train")
    # Other split fractions are another prepared copy.
    other = data.builder("folder", str(prepared), manual_dir=str(manual), split_fractions="0.6,0.2,0.2")
    assert other.data_path != b.data_path and not other.is_prepared()


def test_hash_split_is_deterministic_and_follows_the_fractions():
    paths = [f"class{c}/img_{i}.jpg" for c in range(3) for i in range(2000)]
    splits = [folder.hash_split(p, (0.8, 0.1, 0.1)) for p in paths]
    assert splits == [folder.hash_split(p, (0.8, 0.1, 0.1)) for p in paths]
    # crc32 / 2**32 of the UTF-8 path: the rule needs nothing but zlib, so it never changes.
    assert zlib.crc32(b"cat/a.jpg") / 2**32 == pytest.approx(0.1735, abs=1e-4)
    assert [folder.hash_split(f"cat/{n}.jpg", (0.8, 0.1, 0.1)) for n in "adm"] == [
        "train",
        "validation",
        "test",
    ]
    shares = {s: splits.count(s) / len(paths) for s in data.SPLITS}
    assert shares["train"] == pytest.approx(0.8, abs=0.02) and shares["test"] == pytest.approx(0.1, abs=0.02)
    # Moving fractions only moves images across the boundaries that moved.
    wider = [folder.hash_split(p, (0.7, 0.2, 0.1)) for p in paths]
    assert all(w == s or (s, w) == ("train", "validation") for s, w in zip(splits, wider, strict=True))
    assert folder.parse_fractions("0.8, 0.1,0.1") == (0.8, 0.1, 0.1)
    for bad in ("0.8,0.2", "0.9,0.1,0", "0.5,0.2,0.2", "a,b,c"):
        with pytest.raises(ValueError, match="split_fractions=.*three fractions"):
            folder.parse_fractions(bad)


# ---- layout (b): split folders


def test_split_folders_are_kept_and_a_missing_split_is_carved_from_train(tmp_path):
    files = {}
    for c in ("ant", "bee"):
        for i in range(10):
            files[f"train/{c}/{c}{i}.png"] = _image(i)
        files[f"val/{c}/{c}_v.png"] = _image(100)
    files["val/wasp/wasp_v.png"] = _image(200)  # a class with no training images
    write_files(tmp_path / "src", files)
    with pytest.raises(ValueError, match=r"class folder\(s\) 'wasp' in validation have no training images"):
        data.prepare("folder", str(tmp_path / "src"), str(tmp_path / "p"))
    shutil.rmtree(tmp_path / "src" / "val" / "wasp")
    # Prepared on first use by a stage config that sets its own split fractions.
    config = _config(tmp_path / "src", tmp_path / "p", num_classes=2, split_fractions="0.7,0.15,0.15")
    assert data.dataset_classes(config) == ["ant", "bee"]
    b = data.builder(
        "folder", str(tmp_path / "p"), manual_dir=str(tmp_path / "src"), split_fractions="0.7,0.15,0.15"
    )
    assert b.is_prepared() and b.info.features["label"].names == ["ant", "bee"]
    records = _records(b)
    assert set(records) == {rel for rel in files if "wasp" not in rel}
    for rel, (split, r) in records.items():
        if rel.startswith("val/"):
            assert split == "validation"  # as given, whatever the hash says
        else:  # train: test is missing, so carved; validation is given, so never carved
            wanted = folder.hash_split(rel, (0.7, 0.15, 0.15))
            assert split == ("test" if wanted == "test" else "train")
        assert b.info.features["label"].names[r["label"]] == rel.split("/")[1]
    assert b.info.splits["test"].num_examples > 0


@pytest.mark.parametrize(
    "files, error, message",
    [
        ({}, DataNotFoundError, r"found no images in .*src \(0 other files\)\. Give as manual_dir"),
        (
            {"README.md": "x", ".DS_Store": "x", "a/._x.png": APPLEDOUBLE, "a/notes.txt": "x"},
            DataNotFoundError,
            r"found no images in .*src \(2 other files\)",
        ),
        (
            {**{f"cats/{i}.png": _image(i) for i in range(12)}, "cats/._0.png": APPLEDOUBLE},
            ValueError,
            r"found 1 class folder 'cats' with 12 images in .*src; need at least 2 classes",
        ),
        (
            {
                "cats/1.png": _image(1),
                "dogs/1.png": _image(2),
                "dogs/readme.txt": "x",
                "birds/.DS_Store": "x",
            },
            ValueError,
            r"class folder\(s\) 'birds' in .*src have no images; add images or delete",
        ),
        (
            {"cats/1.png": _image(1), "dogs/1.png": _image(2), "stray.JPG": _image(3, "JPEG")},
            ValueError,
            r"found 1 image directly in .*src \(e\.g\. stray\.JPG\); put each image in a folder named after",
        ),
        (
            {"train/a/1.png": _image(1), "test/a/1.png": _image(1), "extra/a/1.png": _image(1)},
            ValueError,
            r"has split folders \('test', 'train'\) and other folders \('extra'\)",
        ),
        (
            {f"{s}/{c}/1.png": _image(1) for s in ("train", "val", "Validation") for c in "ab"},
            ValueError,
            r"has Validation/ and val/ for the validation split; keep one",
        ),
        (
            {"val/a/1.png": _image(1), "test/a/1.png": _image(1)},
            ValueError,
            r"has split folders 'test', 'val' but no train/ folder",
        ),
        (
            {"train/a/1.png": _image(1), "train/b/1.png": _image(1), "test/readme.txt": "x"},
            ValueError,
            r"src/test has no images; fill it with <class>/<images> or delete it to carve test from train",
        ),
        (
            {"cats/1.png": _image(1), "dogs/1.png": _image(2)},
            ValueError,
            r"the hash split put no image of .*src in validation \(2 images, fraction 0\.1\); add images",
        ),
    ],
    ids=[
        "empty",
        "only-junk",
        "one-class",
        "empty-class",
        "loose-image",
        "split-and-class-folders",
        "val-and-validation",
        "no-train",
        "empty-split-folder",
        "empty-split",
    ],
)
def test_unusable_folders_say_what_they_found(tmp_path, files, error, message):
    (tmp_path / "src").mkdir()
    write_files(tmp_path / "src", files)
    with pytest.raises(error, match=message):
        data.prepare("folder", str(tmp_path / "src"), str(tmp_path / "p"))
    assert not os.path.exists(
        tmp_path / "p" / "vitshap_folder" / folder.config_name(tmp_path / "src", (0.8, 0.1, 0.1)) / "1.0.0"
    )


def test_missing_source_is_reported(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"folder: '.*nowhere' does not exist\. Give as manual_dir"):
        data.prepare("folder", str(tmp_path / "nowhere"), str(tmp_path / "p"))
    with pytest.raises(DataNotFoundError, match=r"folder: no source given\. .*config\.dataset\.manual_dir"):
        data.prepare("folder", None, str(tmp_path / "p"))
    (tmp_path / "list.txt").write_text("path,label\n")
    with pytest.raises(ValueError, match=r"list\.txt is a file but not a \.csv manifest"):
        data.prepare("folder", str(tmp_path / "list.txt"), str(tmp_path / "p"))


# ---- layout (c): a CSV manifest


def test_csv_manifest_with_split_column(tmp_path):
    write_files(tmp_path, {f"imgs/{i}.png": _image(10 * i) for i in range(14)})
    rows = ["Label,path,notes,split"]  # any column order, any header case; other columns ignored
    for i in range(14):
        split = "val" if i in (0, 1) else "train"  # no test rows: test is carved from train
        rows.append(f"{['owl', 'cow'][i % 2]},imgs/{i}.png,note {i},{split}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n\n")  # a trailing blank line is fine
    b = data.prepare("folder", str(tmp_path / "labels.csv"), str(tmp_path / "p"))
    assert b.info.features["label"].names == ["cow", "owl"]
    assert os.path.basename(os.path.dirname(b.data_path)).startswith("labels-")
    records = _records(b)
    assert set(records) == {f"imgs/{i}.png" for i in range(14)}
    for rel, (split, r) in records.items():
        i = int(rel[5:-4])
        assert r["label"] == (1 if i % 2 == 0 else 0)
        assert r["image"][0, 0, 0] == 10 * i
        if i < 2:
            assert split == "validation"
        else:
            assert split == ("test" if folder.hash_split(rel, (0.8, 0.1, 0.1)) == "test" else "train")


def test_csv_integer_labels_are_class_indices(tmp_path):
    write_files(tmp_path, {f"d/{i}.png": _image(i) for i in range(30)})
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(f"d/{i}.png,{i % 3}\n" for i in range(30)))
    found = folder.scan(str(tmp_path / "m.csv"), (0.8, 0.1, 0.1))
    assert found.class_names == ["0", "1", "2"]
    entries = [e for split in data.SPLITS for e in found.splits[split]]
    assert sorted(entries) == sorted((f"d/{i}.png", i % 3) for i in range(30))
    assert all(
        found.splits[s] == [e for e in entries if folder.hash_split(e[0], (0.8, 0.1, 0.1)) == s]
        for s in data.SPLITS
    )


@pytest.mark.parametrize(
    "csv, error, message",
    [
        ("file,label\na.png,x\n", ValueError, r"the header has columns 'file', 'label'; need path and label"),
        ("", ValueError, r"the header has columns \(none\); need path and label"),
        ("path,label\n", DataNotFoundError, r"m\.csv lists no images"),
        (
            "path,label\na.png,x\nnope.png,y\nb.png,y\n",
            DataNotFoundError,
            r"m\.csv: 1 listed file missing, e\.g\. .*nope\.png \(line 3\)",
        ),
        (
            "path,label,split\na.png,x,train\nb.png,y,dev\n",
            ValueError,
            r"m\.csv, line 3: split 'dev' is not train, val",
        ),
        ("path,label\na.png,x\nb.png,\n", ValueError, r"m\.csv, line 3: empty path or label"),
        ("path,label\na.png,x\na.png,y\n", ValueError, r"line 3: a\.png is listed twice \(also line 2\)"),
        (
            "path,label\na.png,0\nb.png,2\n",
            ValueError,
            r"integer labels must be the class indices 0\.\.K-1, found '0', '2' \(missing '1'\)",
        ),
        (
            "path,label\na.png,x\nb.png,x\n",
            ValueError,
            r"found 1 label 'x' with 2 images in .*m\.csv; need at least 2 classes",
        ),
        (
            "path,label,split\na.png,x,train\nb.png,y,test\n",
            ValueError,
            r"class\(es\) 'y' have no training images",
        ),
    ],
    ids=[
        "no-path-column",
        "empty-file",
        "no-rows",
        "missing-file",
        "unknown-split",
        "empty-label",
        "duplicate",
        "label-gap",
        "one-class",
        "class-not-in-train",
    ],
)
def test_bad_csv_manifests_say_which_line(tmp_path, csv, error, message):
    write_files(tmp_path, {"a.png": _image(1), "b.png": _image(2)})
    (tmp_path / "m.csv").write_text(csv)
    with pytest.raises(error, match=message):
        data.prepare("folder", str(tmp_path / "m.csv"), str(tmp_path / "p"))


# ---- unreadable images


def test_truncated_image_stops_with_its_path_or_is_skipped(tmp_path):
    files = {f"{c}/{i}.png": _image(i) for c in ("a", "b") for i in range(10)}
    files["b/broken.png"] = files["b/3.png"][:40]  # truncated mid-file
    write_files(tmp_path / "src", files)
    with pytest.raises(BadImageError, match=r"src/b/broken\.png: cannot read the image.*on_bad_image='skip'"):
        data.prepare("folder", str(tmp_path / "src"), str(tmp_path / "p"))
    b = data.prepare("folder", str(tmp_path / "src"), str(tmp_path / "p"), on_bad_image="skip")
    assert sum(b.info.splits[s].num_examples for s in data.SPLITS) == 20
    with open(os.path.join(b.data_path, data.SKIPPED_FILE)) as f:
        assert f.read() == f"{tmp_path / 'src' / 'b' / 'broken.png'}\n"
    assert "b/broken.png" not in _records(b)


# ---- decoding: every mode becomes the RGB a viewer shows


def _decode(encoded: bytes) -> np.ndarray:
    policy = types.SimpleNamespace(on_bad_image="fail", skipped=[])  # all that decode_image reads
    return np.asarray(ImageBuilder.decode_image(policy, encoded, "x"))


def _palette(transparent: bool) -> PIL.Image.Image:
    image = PIL.Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((1, 0), 1)
    if transparent:
        image.info["transparency"] = 0  # palette entry 0 (red) is transparent
    return image


def _exif_rotated() -> bytes:
    """A 6x5 JPEG stored sideways with EXIF orientation 6 (shown rotated 90 degrees clockwise)."""
    image = PIL.Image.new("RGB", (6, 5), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 3, 5))  # the left half white
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    return _encode(image, "JPEG", exif=exif.tobytes(), quality=95)


def _rgba(mode: str) -> PIL.Image.Image:
    image = PIL.Image.new("RGBA", (2, 1), (10, 20, 30, 0))  # transparent
    image.putpixel((1, 0), (200, 100, 50, 255))  # opaque
    return image.convert(mode)


@pytest.mark.parametrize(
    "encoded, expected",
    [
        # 16-bit grayscale: v -> round(v / 257), not clipped to 255.
        (
            _encode(PIL.Image.fromarray(np.array([[0, 128, 129, 51400, 65535]], np.uint16)), "PNG"),
            [0, 0, 1, 200, 255],
        ),
        (_encode(PIL.Image.fromarray(np.array([[257 * 7, 65535]], np.uint16)), "TIFF"), [7, 255]),
        (
            _encode(PIL.Image.fromarray(np.array([[2570, 65535]], np.uint16)), "PPM"),
            [10, 255],
        ),  # opens as mode I
        (_encode(PIL.Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)), "TIFF"), [0, 128, 255]),
        (_encode(PIL.Image.fromarray(np.array([[-1.0, 0.5, 3.0]], np.float32)), "TIFF"), [0, 96, 255]),
        (_encode(PIL.Image.fromarray(np.array([[-5, 0, 100000]], np.int32)), "TIFF"), [0, 0, 255]),
        (_encode(PIL.Image.new("L", (2, 1), 77), "PNG"), [77, 77]),
        (_encode(PIL.Image.new("1", (2, 1), 1), "PNG"), [255, 255]),
    ],
    ids=["png-16bit", "tiff-16bit", "pgm-16bit", "float-0-1", "float-other", "int32", "gray", "1bit"],
)
def test_high_depth_and_gray_images_become_rgb(encoded, expected):
    rgb = _decode(encoded)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, len(expected), 3)
    np.testing.assert_array_equal(rgb, np.repeat(np.array(expected, np.uint8)[None, :, None], 3, axis=-1))


@pytest.mark.parametrize(
    "encoded, expected",
    [
        (_encode(_rgba("RGBA"), "PNG"), [[255, 255, 255], [200, 100, 50]]),  # transparent -> over white
        (_encode(_rgba("LA"), "PNG"), [[255, 255, 255], [124, 124, 124]]),
        (_encode(_rgba("RGBA"), "WEBP", lossless=True), [[255, 255, 255], [200, 100, 50]]),
        (_encode(_palette(transparent=True), "PNG"), [[255, 255, 255], [0, 0, 255]]),
        (_encode(_palette(transparent=True), "GIF"), [[255, 255, 255], [0, 0, 255]]),
        (_encode(_palette(transparent=False), "PNG"), [[255, 0, 0], [0, 0, 255]]),
        (_encode(PIL.Image.new("CMYK", (2, 1), (0, 255, 255, 0)), "TIFF"), [[255, 0, 0], [255, 0, 0]]),
        (
            _encode(PIL.Image.new("CMYK", (2, 1), (0, 255, 255, 0)), "JPEG", quality=100),
            [[254, 0, 0], [254, 0, 0]],
        ),
    ],
    ids=[
        "rgba",
        "la",
        "rgba-webp",
        "palette-transparent",
        "gif-transparent",
        "palette",
        "cmyk-tiff",
        "cmyk-jpeg",
    ],
)
def test_alpha_palette_and_cmyk_images_become_rgb(encoded, expected):
    rgb = _decode(encoded).astype(int)
    assert np.abs(rgb - np.array([expected])).max() <= 1


def test_exif_orientation_is_applied():
    rgb = _decode(_exif_rotated())
    assert rgb.shape == (6, 5, 3)  # turned upright: 5 wide, 6 high
    assert rgb[0, :, 0].mean() > 200 and rgb[-1, :, 0].mean() < 50  # the white half is now on top
    assert to_rgb(PIL.Image.new("RGB", (1, 1))).mode == "RGB"


def test_unusual_images_in_a_folder_are_prepared_as_shown(tmp_path):
    """End to end: the stored pixels are those of the decoded image (PNG, or the JPEG kept as is)."""
    files = {
        "a/sixteen.png": _encode(PIL.Image.fromarray(np.full((5, 6), 51400, np.uint16)), "PNG"),
        "a/cmyk.jpg": _encode(PIL.Image.new("CMYK", SIZE, (0, 255, 255, 0)), "JPEG", quality=100),
        "a/rgba.png": _encode(_rgba("RGBA"), "PNG"),
        "a/palette.gif": _encode(_palette(transparent=True), "GIF"),
        "a/rotated.jpg": _exif_rotated(),
        "b/plain.jpg": _image(60, "JPEG"),
    }
    files |= {f"b/{i}.png": _image(i) for i in range(12)}
    write_files(tmp_path / "src", files)
    b = data.prepare("folder", str(tmp_path / "src"), str(tmp_path / "p"), split_fractions="0.34,0.33,0.33")
    records = _records(b)
    for rel in [r for r in files if r.startswith("a/")] + ["b/plain.jpg"]:
        np.testing.assert_array_equal(records[rel][1]["image"], _decode(files[rel]), err_msg=rel)
    assert records["a/sixteen.png"][1]["image"].max() == 200
    assert records["a/rotated.jpg"][1]["image"].shape == (6, 5, 3)
    assert folder.keeps_pixels(files["b/plain.jpg"]) and not folder.keeps_pixels(files["a/rotated.jpg"])


def test_image_extensions_are_those_pillow_reads():
    for path in ("x.jpg", "x.JPEG", "a/b.Png", "x.bmp", "x.webp", "x.tif", "x.TIFF", "x.gif", "x.ppm"):
        assert folder.is_image(path), path
    for path in ("README.txt", "labels.csv", "x.pdf", "x.h5", "x.mpg", "x.eps", "noext", "x.json"):
        assert not folder.is_image(path), path


def test_config_names_identify_the_source(tmp_path):
    a = folder.config_name(tmp_path / "Cats & Dogs!", (0.8, 0.1, 0.1))
    assert a.startswith("cats_dogs-") and len(a.split("-")[-1]) == 8
    assert a == folder.config_name(str(tmp_path / "Cats & Dogs!") + "/", [0.8, 0.1, 0.1])
    assert a != folder.config_name(tmp_path / "other" / "Cats & Dogs!", (0.8, 0.1, 0.1))
    assert a != folder.config_name(tmp_path / "Cats & Dogs!", (0.7, 0.2, 0.1))
    assert folder.config_name(tmp_path / "m.CSV", (0.8, 0.1, 0.1)).startswith("m-")


def test_image_files_are_an_unlabeled_source_checked_before_use(tmp_path):
    """`data.ImageFiles` (`explainer.extra_images`): every image under the folder, recursively and
    sorted, hidden files and other files skipped, decoded to uint8 RGB, label -1; a folder without
    images, a missing folder and a file Pillow cannot read are errors that name them. `Concatenated`
    puts sources one after the other."""
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8)
    rgb = np.random.default_rng(0).integers(0, 255, (5, 7, 3), np.uint8)
    write_files(
        tmp_path / "more",
        {
            "b.png": _encode(PIL.Image.fromarray(gray, "L"), "PNG"),
            "a/z.png": _encode(PIL.Image.fromarray(rgb), "PNG"),
            "README.txt": b"not an image",
            ".hidden.png": b"not read",
            "._b.png": b"a macOS sidecar",
        },
    )
    files = data.ImageFiles(str(tmp_path / "more"))
    assert [os.path.relpath(p, tmp_path / "more") for p in files.paths] == ["a/z.png", "b.png"]
    np.testing.assert_array_equal(files[0]["image"], rgb)
    np.testing.assert_array_equal(files[1]["image"], np.repeat(gray[..., None], 3, -1))
    assert files[1]["label"] == -1 and len(files) == 2
    both = data.Concatenated([{"image": 0, "label": 3}] * 3, files)
    assert len(both) == 5 and both[2]["label"] == 3 and both[3]["label"] == -1
    np.testing.assert_array_equal(both[4]["image"], files[1]["image"])
    with pytest.raises(IndexError):
        both[5]
    png = _encode(PIL.Image.fromarray(rgb), "PNG")
    write_files(tmp_path / "cut", {"x.png": png[: len(png) // 2]})  # the header reads, the pixels do not
    with pytest.raises(BadImageError, match=r"x.png cannot be decoded .*: remove it and rerun"):
        data.ImageFiles(str(tmp_path / "cut"))[0]
    write_files(tmp_path / "more", {"c.jpg": b"broken"})
    with pytest.raises(BadImageError, match=r"config.explainer.extra_images: .*c.jpg is not an image Pillow"):
        data.ImageFiles(str(tmp_path / "more"))
    write_files(tmp_path / "none", {"notes.txt": b"x"})
    with pytest.raises(DataNotFoundError, match=r"extra_images=.*none': the folder holds no image files"):
        data.ImageFiles(str(tmp_path / "none"))
    with pytest.raises(DataNotFoundError, match=r"no such folder"):
        data.ImageFiles(str(tmp_path / "missing"))
