"""The work dir's lock: one run at a time in a work dir, released however the run ends."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterator

LOCK_FILE = ".lock"  # in the work dir, holding the PID of the run that holds it


@contextlib.contextmanager
def work_dir_lock(work_dir: str) -> Iterator[Callable[[int], None] | None]:
    """An exclusive ``flock`` on ``work_dir``/.lock for as long as the context lasts, the file holding this
    process's PID: two runs in one work dir at once interleaved metrics.csv, overwrote each other's checkpoints and
    deleted each other's ``.partial`` files. ValueError naming the work dir and the holder's PID when another run
    holds it. The kernel drops the lock when its process ends, however it ends, so a killed run leaves no stale lock;
    the file stays (removing it would let a third run lock a new file while the second still holds the removed one).
    No locking on Windows (no fcntl), nor, with a warning, on a file system that refuses flock.

    Yields the ``worker_init_fn`` for DataLoaders made meanwhile (None when nothing is locked): the flock belongs to
    the open file, which forked workers share, so a run killed outright (SIGKILL, the OOM killer) kept its work dir
    locked until its workers noticed, 5 s later; each worker closes its copy as it starts."""
    if sys.platform == "win32":
        yield None
        return
    import fcntl

    path = os.path.join(work_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()  # empty while the holder is writing it
            pid = f" (PID {holder})" if holder.isdigit() else ""
            raise ValueError(f"work dir {work_dir!r} is in use by another run{pid}: wait for it to end, or start this "
                             "run in another --work-dir") from None  # fmt: skip
        except OSError as exc:  # e.g. ENOLCK, EOPNOTSUPP: some network and FUSE file systems
            warnings.warn(f"cannot lock {path} ({exc.strerror or exc}): nothing keeps another run from using this "
                          "work dir at the same time", stacklevel=3)  # fmt: skip
            locked = False
        if locked:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield functools.partial(_close_copy, fd, os.fstat(fd)) if locked else None
        finally:
            if locked:
                os.ftruncate(fd, 0)  # no PID of a run that has ended
                fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly: forked DataLoader workers share this descriptor
    finally:
        os.close(fd)


def _close_copy(fd: int, opened: os.stat_result, worker_id: int) -> None:
    """A DataLoader worker's copy of the work-dir lock's descriptor, closed; only if ``fd`` is that file here (a
    worker started by spawn or forkserver inherits no descriptors: the number may be another file's)."""
    with contextlib.suppress(OSError):
        here = os.fstat(fd)
        if (here.st_dev, here.st_ino) == (opened.st_dev, opened.st_ino):
            os.close(fd)
