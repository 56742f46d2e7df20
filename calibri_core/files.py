"""Writing files so that a crash never leaves a half-written one: nothing the user had is lost or corrupted."""

from __future__ import annotations

import os
import tempfile

_TEMP_EXTRA = len("..") + 8 + len(".tmp")  # what mkstemp adds around the name: "." name "." 8 random chars ".tmp"


def name_limit(folder: str) -> int:
    """The longest file name (in bytes) the file system under ``folder`` takes: PC_NAME_MAX, or 255."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (AttributeError, OSError, ValueError):
        return 255


def check_name_length(path: str | os.PathLike) -> None:
    """Raise a ValueError naming the file if its name is longer than its folder's file system allows."""
    path = os.fspath(path)
    name = os.path.basename(path)
    limit = name_limit(os.path.dirname(os.path.abspath(path)) or ".")
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > limit:
        raise ValueError(f"Calibri: the file name {name[:40]!r}... is {size} bytes long; this file system takes at "
                         f"most {limit}. Choose a shorter name.")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: temp file in the same folder, fsync, rename, fsync the folder.

    An existing file keeps its permission bits; on any failure the temp file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644
    # The temporary name is cut so that any name the file system takes can be written (issue 10: a 235-character
    # name failed with ENAMETOOLONG because of the ~14 characters mkstemp adds).
    stem = os.path.basename(path).encode("utf-8", "surrogateescape")[:max(1, name_limit(folder) - _TEMP_EXTRA)]
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{stem.decode('utf-8', 'ignore')}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable; not possible on every platform
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
