"""Helpers several test files share (test modules do not import each other for these)."""

import os


def write_files(root, files: dict) -> None:
    """Writes `{relative path: bytes or str}` under `root`, creating folders as needed."""
    for rel, content in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
