"""The `explain` command: heatmaps and values for users' own images, with a trained run; optionally
shapiq's file format and pairwise patch interactions (`configs/explain.py`)."""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging

from vitshap_jax.data.base import is_hidden, read_image
from vitshap_jax.data.folder import is_image
from vitshap_jax.errors import StageError
from vitshap_jax.files import absolute
from vitshap_jax.runs import TrainedRun
from vitshap_jax.shapiq_interop import image_parameters, write_interaction_values
from vitshap_jax.shapley.game import select_class
from vitshap_jax.shapley.interactions import interactions
from vitshap_jax.viz.heatmaps import save_explanation
from vitshap_jax.viz.interactions import save_interactions


class SomeImagesFailed(StageError):
    """Some files could not be read; the others were explained."""


def image_paths(spec: str) -> list[str]:
    """Files named in `spec` (comma-separated), folders expanded to the image files inside (sorted; any
    extension Pillow decodes, hidden files and macOS sidecars skipped). A folder without images is an
    error that names it."""
    paths = []
    for item in (p.strip() for p in spec.split(",")):
        if not item:
            continue
        item = os.path.expanduser(item)
        if os.path.isdir(item):
            found = [
                os.path.join(item, f)
                for f in sorted(os.listdir(item))
                if not is_hidden(f) and is_image(f) and os.path.isfile(os.path.join(item, f))
            ]
            if not found:
                raise StageError(
                    f"config.images: the folder {item} holds no image files; name images or folders of images"
                )
            paths += found
        else:
            paths.append(item)
    if not paths:
        raise StageError("config.images names no files: --config.images=a.jpg,b.png,folder/")
    return paths


def output_names(paths: list[str]) -> dict[str, str]:
    """A distinct output name per input path: the file name without extension, or, where two inputs
    share one (`a/x.png`, `b/x.png`, `b/x.jpg`), their path below the common folder with `/` and `.`
    written as `__` and `_` (`a__x_png`)."""
    stems = {p: os.path.splitext(os.path.basename(p))[0] for p in paths}
    counts = {}
    for stem in stems.values():
        counts[stem] = counts.get(stem, 0) + 1
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]) if paths else ""
    names, used = {}, set()
    for p in paths:
        name = stems[p]
        if counts[name] > 1:
            rel = os.path.relpath(os.path.abspath(p), root)
            name = rel.replace(os.sep, "__").replace(".", "_")
        base, k = name, 1
        while name in used:  # the same file named twice
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        names[p] = name
    return names


def pair_interactions(config, trained, images, out: dict, start: int) -> dict:
    """Order-2 interactions (`config.interactions`) of each image's top class (highest v(all)) among its
    `config.interaction_players` patches with the largest |value|, in the surrogate's game (the other
    patches visible): numpy arrays per image (players sorted by patch index)."""
    phi = out["phi"]  # [B, n, C]
    k = min(config.interaction_players, phi.shape[1])
    classes = np.argmax(out["v_all"], axis=-1)
    top = select_class(np.abs(phi), classes)
    players = np.sort(np.argsort(-top, axis=1, kind="stable")[:, :k], axis=1)
    result = interactions(
        trained.game(),
        images,
        trained.num_players,
        index=config.interactions,
        players=players,
        budget=config.interaction_budget,
        key=jax.random.fold_in(jax.random.key(0), start),
        chunk=max(8, 1024 // len(images)),  # about 2,048 model passes per call, whatever the batch
    )
    rows = np.arange(len(images))
    return {
        "class": classes,
        "players": players,
        "values": result["values"][rows, :, classes],
        "pairs": result["pairs"][rows, :, :, classes],
        "baseline": result["baseline"][rows, classes],
        "exact": np.full(len(images), result["exact"]),
        "evals": np.full(len(images), result["evals"]),
    }


def run(config, workdir: str, mesh) -> dict:
    trained = TrainedRun.load(workdir, dataset=config.dataset, command="explain")
    paths, failed, done = image_paths(config.images), [], {}
    names = output_names(paths)
    out_dir = absolute(config.output_dir or os.path.join(workdir, "explanations"))
    os.makedirs(out_dir, exist_ok=True)
    images = []
    for path in paths:
        try:
            images.append((path, read_image(path)))
        except Exception as e:  # unreadable, missing, not an image: report and go on
            failed.append(f"{path}: {type(e).__name__}: {e}")
    size = config.batch_size
    for start in range(0, len(images), size):
        chunk = images[start : start + size]
        batch = np.stack([trained.preprocess(img) for _, img in chunk])
        padded = np.concatenate(
            [batch, np.zeros((size - len(chunk), *batch.shape[1:]), batch.dtype)]
        )  # one shape
        out = {k: np.asarray(v)[: len(chunk)] for k, v in trained(padded).items()}
        pairs = pair_interactions(config, trained, batch, out, start) if config.interactions else None
        for i, (path, img) in enumerate(chunk):
            target = os.path.join(out_dir, names[path])
            extra = {} if pairs is None else {f"interaction_{k}": v[i] for k, v in pairs.items()}
            np.savez(
                target + ".npz",
                phi=out["phi"][i],
                v_all=out["v_all"][i],
                v_empty=out["v_empty"][i],
                class_names=np.array(trained.class_names),
                patch_size=trained.patch_size,
                image_size=trained.image_size,
                **extra,
            )
            shown = np.argsort(-out["v_all"][i])[: config.max_classes]
            titles = [f"{trained.class_names[c]} (p={out['v_all'][i][c]:.2f})" for c in shown]
            view = trained.crop(img)
            save_explanation(
                view,
                out["phi"][i][:, shown],
                [trained.class_names[c] for c in shown],
                target + ".png",
                titles=titles,
            )
            about = dict(
                image=os.path.basename(path), image_size=trained.image_size, patch_size=trained.patch_size
            )
            if config.export == "shapiq":
                for c in shown:
                    write_interaction_values(
                        f"{target}.class{c}.json",
                        out["phi"][i][:, c],
                        float(out["v_empty"][i][c]),
                        estimated=True,  # a learned (amortized) estimate
                        description="vitshap_jax explainer (one forward pass)",
                        **image_parameters(class_name=trained.class_names[c], class_index=c, **about),
                    )
            if pairs is not None:
                c, players = int(pairs["class"][i]), pairs["players"][i]
                write_interaction_values(
                    f"{target}.{config.interactions}.json",
                    pairs["values"][i],
                    float(pairs["baseline"][i]),
                    pairs=pairs["pairs"][i],
                    index=config.interactions,
                    estimated=not pairs["exact"][i],
                    budget=int(pairs["evals"][i]),
                    description="vitshap_jax surrogate game, other patches visible",
                    **image_parameters(
                        class_name=trained.class_names[c], class_index=c, players=players, **about
                    ),
                )
                save_interactions(
                    view,
                    pairs["values"][i],
                    pairs["pairs"][i],
                    target + ".interactions.png",
                    grid=trained.image_size // trained.patch_size,
                    players=players,
                    title=f"{config.interactions}: {trained.class_names[c]}",
                )
            done[path] = target
    logging.info("explained %d images into %s", len(done), out_dir)
    print(f"explained {len(done)} of {len(paths)} images; results in {out_dir}")
    if failed:
        raise SomeImagesFailed(
            f"{len(failed)} of {len(paths)} files could not be explained:\n  " + "\n  ".join(failed)
        )
    return done
