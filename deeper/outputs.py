"""Writing outputs so a full disk or a kill leaves the previous file (or none), never half of one.

Every file a stage, `deeper refine` or the store tools write goes first to a hidden sibling
(`.<name>.partial`, in the same folder so the rename stays in one filesystem), is flushed to disk, and is then
renamed over the target with `os.replace`, which POSIX makes atomic: a reader (DVC hashing an output, the next
stage) sees the old bytes or the new ones. A write that fails removes its sibling; a SIGKILL leaves it, and the
next write of the same target overwrites it (a fixed name, so kills do not pile up files). A folder output (a
trained adapter, a plots folder) is built the same way under `.<name>.partial/` and swapped in with two renames.

A full disk (ENOSPC, a quota, a file-size limit) becomes one `DiskFull` line naming the target: the previous
output is kept, and the response cache holds every model call already made, so the run after space is freed
resumes.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deeper.errors import DeeperError, first_line

FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# libraries that wrap the OS error lose errno but keep its text: pyarrow ("No space left on device"), sqlite
# ("database or disk is full"), DuckDB ("No space left on device")
FULL_MARKS = ("no space left on device", "disk is full", "disk quota exceeded", "file too large")


class DiskFull(DeeperError):
    """A write that found no space left; the previous output is kept."""

    def __init__(self, path, detail: str = ""):
        self.path = str(path)
        super().__init__(
            f"{path}: no space left on the device{f' ({detail})' if detail else ''}; nothing "
            f"half-written was left, the previous file (if any) is kept: free space and re-run "
            f"(finished model calls are in the response cache)"
        )


def is_disk_full(error: BaseException) -> bool:
    """True for an error that says the disk (or a quota, or a file-size limit) is full."""
    if isinstance(error, OSError) and error.errno in FULL_ERRNOS:
        return True
    return any(mark in str(error).lower() for mark in FULL_MARKS)


def partial_path(path: str | Path) -> Path:
    """Where `path` is written before it replaces the target."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a written file (every file of a folder) to disk, so the rename never publishes unwritten blocks."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def replacing(path: str | Path, folder: bool = False) -> Iterator[Path]:
    """Yield the partial path to write `path`'s new content to (a folder, created empty, when `folder`); on
    success it replaces `path`. On any error the partial is removed and `path` is left as it was; a full disk
    is re-raised as DiskFull."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    _remove(partial)  # a kill's leftover
    if folder:
        partial.mkdir()
    try:
        yield partial
        _fsync(partial)
        if folder:
            _swap_folder(partial, path)
        else:
            os.replace(partial, path)
    except BaseException as e:
        _remove(partial)
        if isinstance(e, Exception) and not isinstance(e, DeeperError) and is_disk_full(e):
            raise DiskFull(path, first_line(e)) from None
        raise


def _swap_folder(partial: Path, path: Path) -> None:
    """Put the built folder in place of `path`: one atomic exchange where the kernel offers it (Linux
    renameat2 RENAME_EXCHANGE: a reader sees the old folder or the new one, never neither), else two renames, where
    a kill between them leaves the old folder under `.<name>.old` and no `path` (the previous output or none;
    the next write clears it)."""
    old = path.with_name(f".{path.name}.old")
    _remove(old)
    if path.is_dir() and not path.is_symlink():
        if _exchange(partial, path):
            _remove(partial)  # now the old folder
            return
        os.replace(path, old)
    elif path.exists() or path.is_symlink():
        path.unlink()
    os.replace(partial, path)
    _remove(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where this system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # glibc before 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if done == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # a filesystem or kernel without the flag
        return False
    raise OSError(code, os.strerror(code), str(b))


def write_text(path: str | Path, text: str) -> None:
    """`path` holds `text` (UTF-8), or what it held before."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_parquet(table, path: str | Path, schema=None) -> None:
    """`path` holds `table` (a pandas DataFrame, written without its index, or a pyarrow Table) as Parquet, or
    what it held before. `schema` (pyarrow) fixes a DataFrame's column types."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, schema=schema, preserve_index=False)
    with replacing(path) as tmp:
        pq.write_table(table, tmp)


def write_csv(path: str | Path, fieldnames, rows) -> None:
    """`path` holds `rows` (dicts) as CSV under a `fieldnames` header with "\\n" line ends, or what it held
    before."""
    import csv

    with replacing(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fieldnames), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
