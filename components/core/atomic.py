"""Write outputs under a temporary name and move them into place, so a killed run leaves the
previous output whole, never a half-written one.

A folder has one writer at a time: `atomic_dir` holds an OS file lock beside it (filelock;
let go by the OS when its holder dies) while it writes, and a second writer of the same folder
waits for the first, saying so, rather than taking the first's temporary folder for a killed
run's leftover (search workers share `paths.prepared`). A disk that fills while an output is
written ends the step with `DiskFull`, a UserError naming the filesystem and what to free; the
previous output is left as it was, and what was half-written is removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import filelock

from components.core.params import UserError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, and a full quota


class DiskFull(UserError):
    """The disk (or the user's quota) filled while an output was written."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _no_space(err: BaseException | None) -> bool:
    """Whether `err`, or an error it was raised from or while handling, is a full disk (torch's
    writer, for one, reports the OSError of its file as a RuntimeError raised while handling
    it)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, DiskFull) or isinstance(err, OSError) and err.errno in NO_SPACE:
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _disk_full(path: Path) -> DiskFull:
    """The error for a full disk while writing `path`, after the half-written part is gone."""
    mount = path.resolve().parent
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    usage = shutil.disk_usage(mount)
    return DiskFull(
        f"no space left on {mount} while writing {path} ({usage.free / 2**20:.1f} MiB free of "
        f"{usage.total / 2**20:.1f} MiB). Free space there (old outputs and search trials you no "
        "longer need, DVC's cache: `dvc gc`, MLflow's artifacts) or set the path in params.yaml "
        "(paths) to a larger disk, then run again: the previous output, if any, is untouched and "
        "nothing half-written was left")


@contextmanager
def _no_space_names(path: Path) -> Iterator[None]:
    """A full disk inside the block becomes DiskFull about `path` (once the block has removed
    what it half wrote, so the free space it reports is what there is)."""
    try:
        yield
    except BaseException as err:
        if _no_space(err):
            raise _disk_full(path) from None
        raise


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it replaces `path` at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _no_space_names(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; outputs are ordinary files
        try:
            yield Path(tmp)
            os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_json(path: str | Path, obj: Any) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return Path(path)


@contextmanager
def _only_writer(final: Path) -> Iterator[None]:
    """Hold `final`'s lock (`.NAME.lock` beside it) for the block, waiting for another holder."""
    path = final.with_name(f".{final.name}.lock")
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        print(f"waiting: another process is writing {final}; this one writes it again when that "
              f"one is done (lock {path})", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        # Removed while held: a waiter that opened it finds it unlinked and opens a new one
        # (filelock checks), so the lock stays exclusive and leaves nothing behind.
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        lock.release()


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; on success it takes `final`'s place.

    A folder cannot be swapped in one rename, so the old one is first renamed aside; if a kill
    lands between the two renames, the next call puts the old folder back before it starts.
    The old folder's .gitignore comes along: DVC lists there the outputs that git must not track,
    and writes it again only when it runs the stage itself, not when a step is run by hand.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _only_writer(final), _no_space_names(final):
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            if final.exists():
                shutil.rmtree(old)
            else:
                old.rename(final)
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a killed run's: no writer holds the lock
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        tmp.chmod(0o777 & ~_umask())
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        ignored = final / ".gitignore"
        if ignored.is_file() and not (tmp / ".gitignore").exists():
            shutil.copy2(ignored, tmp / ".gitignore")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
