"""Writing a file so that a reader sees the old one or the whole new one, and a full disk says so.

:func:`write_atomic` writes to a temporary file in the target's folder (``.<name>.<pid>.tmp``: the
process's own, so ranks writing the same file do not meet), fsyncs it, renames it over the target
and fsyncs the folder. A write that fails removes its temporary file and leaves the old file as it
was. A failure because the disk is full raises :class:`DiskFullError`, one line: the path, the
megabytes free and the megabytes the write needed. :func:`disk_full_named` gives the same message
for writes made by other code (DeepSpeed's checkpoint files), and :func:`require_free_space`
refuses to start what the disk cannot hold.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

MB = 1 << 20
# Below this much free space a failed write is taken for a full disk, whatever the library's
# wording (torch's zip writer says "unexpected pos", safetensors "IoError").
NEARLY_FULL_BYTES = 4 * MB
_FULL_WORDS = ("No space left", "os error 28", "StorageFull", "ENOSPC", "Disk quota exceeded")


class DiskFullError(OSError):
    """A write that the disk could not hold, said in one line."""

    def __init__(self, path: str | os.PathLike, free_bytes: int, needed_bytes: int, what: str = "the file"):
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.path, self.free_bytes, self.needed_bytes, self.what = Path(path), free_bytes, needed_bytes, what

    def __str__(self) -> str:
        return (
            f"no space left on device writing {self.path} ({self.free_bytes / MB:.0f} MB free, {self.what} "
            f"needs about {max(1, round(self.needed_bytes / MB))} MB)"
        )


def free_bytes(path: str | os.PathLike) -> int:
    """Free space (for an unprivileged writer) on the file system holding ``path`` or its nearest existing parent."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def is_disk_full(error: BaseException, path: str | os.PathLike) -> bool:
    """Whether ``error``, raised writing ``path``, means the disk is full."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(word in str(error) for word in _FULL_WORDS):
        return True
    try:
        return free_bytes(path) < NEARLY_FULL_BYTES
    except OSError:
        return False


@contextmanager
def disk_full_named(
    path: str | os.PathLike, needed_bytes: int | Callable[[], int] = 0, what: str = "the file"
) -> Iterator[None]:
    """Turn a failure of the writes inside into :class:`DiskFullError` when the disk is full.
    ``needed_bytes``: what the write needs (a callable is asked only on failure)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if not is_disk_full(e, path):
            raise
        needed = needed_bytes() if callable(needed_bytes) else needed_bytes
        raise DiskFullError(path, free_bytes(path), needed, what) from e


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under this process's umask (0644 under 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def temporary_name(path: str | os.PathLike) -> Path:
    """The name :func:`write_atomic` writes ``path`` under first (this process's)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(
    path: str | os.PathLike, content: str | bytes | Callable[[Path], None], what: str = "the file"
) -> None:
    """Replace ``path`` with ``content`` (text, bytes, or a function writing the file it is given),
        through a temporary file in the same folder: fsync, rename, fsync the folder; the file gets the
    mode a plain ``open`` gives (whatever library wrote it). On failure the
        temporary file is removed and ``path`` is as before; a full disk raises :class:`DiskFullError`."""
    path = Path(path)
    tmp = temporary_name(path)
    data = content.encode() if isinstance(content, str) else content

    def needed() -> int:
        if isinstance(data, bytes):
            return len(data)
        return tmp.stat().st_size if tmp.exists() else 0  # what it had written: the least it needed

    try:
        with disk_full_named(path, needed, what):
            if isinstance(data, bytes):
                with open(tmp, "wb") as f:
                    f.write(data)
            else:
                data(tmp)
            os.chmod(tmp, plain_file_mode())  # as open() makes it (safetensors' writer makes 0600)
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; a failed write's leftover otherwise


class NotEnoughSpaceError(DiskFullError):
    """A start refused because the disk cannot hold what it would write."""

    def __str__(self) -> str:
        return (
            f"not enough space on the disk of {self.path}: {self.free_bytes / MB:.0f} MB free, {self.what} "
            f"needs about {max(1, round(self.needed_bytes / MB))} MB; free some space or choose another folder"
        )


def require_free_space(folder: str | os.PathLike, needed_bytes: int, what: str) -> None:
    """Refuse (:class:`NotEnoughSpaceError`) when ``folder``'s disk has less than ``needed_bytes`` free."""
    free = free_bytes(folder)
    if free < needed_bytes:
        raise NotEnoughSpaceError(folder, free, needed_bytes, what)
