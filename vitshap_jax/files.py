"""Paths and result files: what every stage and command writes the same way."""

from __future__ import annotations

import json
import os


def absolute(path: str) -> str:
    """`path` with `~` expanded, made absolute (how every path a user gives is read)."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def write_json(path: str, obj, **options) -> None:
    """Writes `obj` as indented JSON through a temporary file and a rename: a reader (or a run killed
    mid-write) never sees a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, **options)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)
