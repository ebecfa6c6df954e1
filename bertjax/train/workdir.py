"""One writer per workdir: `with workdir.lock(path):` around everything a run writes there.

Two runs writing one workdir interleave their metrics rows and overwrite each other's checkpoints, so
the second refuses at start, before it writes anything, with a `WorkdirInUseError` that names the
holder's PID, host and start time and the lock file.

The lock is `fcntl.flock` on WORKDIR/.lock, held on a file kept open for the life of the run. The
kernel releases it when the process ends in any way, kill -9 included, so a lock can never outlive its
holder. The file's content (PID, host, start time, command) is only information: a clean exit empties
it; a killed run leaves it behind, and the next run, finding the lock free but the file not empty,
takes over and logs whose stale lock it was. The file is never deleted: deleting a lock file lets two
processes hold locks on two different files of the same name.

Multi-host runs: only process 0 locks, since the hosts of one run share the workdir by design.

NFS: Linux maps flock onto NFS byte-range locks (NLM for v3, built in for v4), which other hosts do see;
a host that dies keeps its lock until the server's lease runs out (about 90 s on v4). On a mount with
`nolock`, and on some FUSE filesystems, locks are local to each host: two hosts then both get the
lock, and only the stale-lock warning (which names the other host) hints at it.

The lock file is also the first thing a run writes, so a read-only workdir fails here, in one line.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
import sys
from collections.abc import Iterator

import jax

from bertjax.errors import UserError

LOCK_FILE = ".lock"

log = logging.getLogger(__name__)


class WorkdirInUseError(UserError):
    """Another process holds the workdir's lock; the message names its PID and host."""


def _holder(text: str) -> dict:
    try:
        return json.loads(text)
    except ValueError:
        return {}


def _describe(holder: dict) -> str:
    return f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {holder.get('started', '?')})"


def _open(workdir: pathlib.Path) -> int:
    """The lock file's descriptor; a workdir that cannot be written is a one-line error."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        return os.open(workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UserError(f"workdir {workdir} is not writable ({error.strerror}): choose another --workdir or fix its permissions") from None
        if error.errno == errno.ENOSPC:
            raise UserError(f"workdir {workdir}: no space left on device: free space or choose another --workdir") from None
        raise


@contextlib.contextmanager
def lock(workdir) -> Iterator[pathlib.Path]:
    """Hold WORKDIR/.lock for the duration of the block (process 0 only); yields the absolute workdir."""
    workdir = pathlib.Path(workdir).expanduser().absolute()
    if jax.process_index() != 0:  # the hosts of one multi-host run share the workdir: process 0 locks for all
        yield workdir
        return
    path = workdir / LOCK_FILE
    descriptor = _open(workdir)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.pread(descriptor, 4096, 0).decode("utf-8", "replace"))
            raise WorkdirInUseError(
                f"workdir {workdir} is in use by {_describe(holder)}; lock file {path}: wait for that run to end, or choose another --workdir"
            ) from None
        stale = _holder(os.pread(descriptor, 4096, 0).decode("utf-8", "replace"))
        if stale:
            other_host = stale.get("host") != socket.gethostname()
            log.warning(
                "%s: taking over the stale lock of %s, which ended without releasing it%s",
                path,
                _describe(stale),
                " (if it still runs there, this filesystem does not share locks between hosts)" if other_host else "",
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(descriptor)
        try:
            yield workdir
        finally:
            os.ftruncate(descriptor, 0)
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)
