"""Files on a local disk or in an object store (``gs://``) through ``etils.epath``, written whole."""

from __future__ import annotations

import os

from etils import epath


def is_local(path) -> bool:
    return "://" not in os.fspath(path)


def as_path(path) -> epath.Path:
    """An epath for ``path``; local paths made absolute (Orbax's writer and file locks need them)."""
    text = os.fspath(path)
    return epath.Path(os.path.abspath(text) if is_local(text) else text)


def write(path, data: str | bytes) -> None:
    """Writes a whole file so that no reader ever sees part of it.

    Locally: a temporary file renamed into place. An object store replaces an object whole by itself (and
    a rename there is a copy), so the object is written directly.
    """
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_fn = "write_bytes" if isinstance(data, bytes) else "write_text"
    if not is_local(path):
        getattr(path, write_fn)(data)
        return
    partial = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        getattr(partial, write_fn)(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


class WholeObjectWriter:
    """A file-like writer for an object store, which cannot append: it keeps what was written and puts the
    whole object again at each ``flush`` (TensorBoard event files are small enough for that)."""

    def __init__(self, path):
        self._path = as_path(path)
        self._data = bytearray()

    def write(self, data: bytes) -> None:
        self._data += data

    def flush(self) -> None:
        self._path.write_bytes(bytes(self._data))

    def close(self) -> None:
        self.flush()


class WholeObjectWriterFactory:
    """tensorboardX's writer factory interface over :class:`WholeObjectWriter` (object stores need no
    directories)."""

    def open(self, path: str) -> WholeObjectWriter:
        return WholeObjectWriter(path)

    def directory_check(self, path: str) -> None:
        del path
