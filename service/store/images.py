"""Output images, written through fsspec: a local folder by default, any fsspec URL (s3://…)."""

from __future__ import annotations

import base64
import contextlib
import io
import re
import time
import uuid

import fsspec
import numpy as np
from PIL import Image

# `{32 hex}-{index}.png|.base64`, optionally under `temp/`: the only names the store serves,
# so a request can never reach outside it.
IMAGE_NAME = re.compile(r"^(temp/)?[0-9a-f]{32}-\d{1,2}\.(png|base64)$")
TEMP_LIFETIME_S = 24 * 3600
PARTIAL_LIFETIME_S = 3600  # a write that old was interrupted


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def output_names(file_prefix: str, samples: int, as_base64: bool, temp: bool) -> list[str]:
    suffix = "base64" if as_base64 else "png"
    folder = "temp/" if temp else ""
    return [f"{folder}{file_prefix}-{i}.{suffix}" for i in range(samples)]


class ImageStore:
    """Writes and reads output files by name; names are checked against IMAGE_NAME."""

    def __init__(self, url: str):
        self._fs, self._root = fsspec.core.url_to_fs(url)
        self._root = self._root.rstrip("/")
        self._fs.makedirs(self._root + "/temp", exist_ok=True)

    def check_writable(self) -> None:
        """Write and remove a probe file: a store that cannot be written fails here, at start,
        rather than on every job."""
        probe = f"{self._root}/.write-check-{uuid.uuid4().hex}"
        with self._fs.open(probe, "wb") as f:
            f.write(b"sdserve")
        self._fs.rm_file(probe)

    def _path(self, name: str) -> str:
        if not IMAGE_NAME.match(name):
            raise KeyError(name)
        return f"{self._root}/{name}"

    def write(self, name: str, image: np.ndarray) -> None:
        png = encode_png(image)
        data = base64.b64encode(png) if name.endswith(".base64") else png
        # Write then rename so a reader never sees half a file.
        path = self._path(name)
        partial = f"{path}.partial"
        with self._fs.open(partial, "wb") as f:
            f.write(data)
        self._fs.mv(partial, path)

    def delete(self, names: list[str]) -> None:
        """Remove these outputs and any half-written copy of them."""
        for name in names:
            path = self._path(name)
            for candidate in (path, f"{path}.partial"):
                with contextlib.suppress(FileNotFoundError):
                    self._fs.rm_file(candidate)

    def read(self, name: str) -> bytes | None:
        """The file's bytes, or None when it does not exist (yet) or has expired."""
        try:
            path = self._path(name)
        except KeyError:
            return None
        try:
            if name.startswith("temp/") and self._age_s(path) > TEMP_LIFETIME_S:
                return None
            with self._fs.open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _age_s(self, path: str) -> float:
        return _age_of(self._fs.info(path))

    def prune(self, max_age_s: float | None = None) -> int:
        """Delete what will never be served again: `temp` images past their 24 hours, write
        leftovers (`.partial`) older than an hour, and with `max_age_s` every image older than
        that. Only output names are touched. Returns how many files were deleted."""
        doomed = []
        for path, info in self._fs.find(self._root, detail=True).items():
            name = path[len(self._root) :].lstrip("/")
            if name.endswith(".partial"):
                limit = PARTIAL_LIFETIME_S if IMAGE_NAME.match(name[: -len(".partial")]) else None
            elif IMAGE_NAME.match(name):
                limit = TEMP_LIFETIME_S if name.startswith("temp/") else max_age_s
                if max_age_s is not None and limit is not None:
                    limit = min(limit, max_age_s)
            else:
                limit = None  # not ours: never deleted
            if limit is not None and _age_of(info) > limit:
                doomed.append(path)
        for path in doomed:
            with contextlib.suppress(FileNotFoundError):  # another replica pruned it first
                self._fs.rm_file(path)
        return len(doomed)


def _age_of(info: dict) -> float:
    modified = info.get("mtime") or info.get("LastModified") or info.get("created")
    if modified is None:
        return 0.0
    stamp = modified.timestamp() if hasattr(modified, "timestamp") else float(modified)
    return time.time() - stamp
