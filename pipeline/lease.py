"""One writer per output directory: the lease that `vlcurate run` and `vlcurate select` hold while they write.

The lease is a small JSON record, ``_state/lease.json`` in the output directory: the holder's host and pid, what
it is doing, when it started, a heartbeat time that a daemon thread renews while the holder lives, and a random
token. Taking the lease creates the record atomically: it is written in full under a temporary name and
hard-linked into place, and the link fails when a record is already there, so a reader never sees a half-written
record and of two writers exactly one wins. The other refuses with a one-line ``LeaseError`` that names the
holder. A lease whose holder is gone is taken over with a one-line warning: at once when the holder ran on this
host and its pid has exited, otherwise when its heartbeat is older than the timeout (5 minutes). Renewing and
releasing only ever touch a record that still holds this lease's token; a holder that finds its record taken
over (it stalled for longer than the timeout) warns, and ``lost`` says so.

Every filesystem call on the record is in ``FileLeaseStore``, behind four operations: read, create if absent,
replace if unchanged, delete if unchanged. In an object store the same four are conditional requests
(``pipeline.storage.ObjectLeaseStore``): a put with ``If-None-Match: *`` instead of the exclusive link, and
``If-Match: ETAG`` for replace and delete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import socket
import stat
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Protocol

from pipeline.storage import TMP_MARK

LEASE_PATH = Path("_state", "lease.json")  # inside the output directory
LEASE_TIMEOUT = 300.0  # seconds without heartbeat after which a lease counts as abandoned, from any host
HEARTBEAT_INTERVAL = 30.0
MAX_RECORD_BYTES = 64 * 1024
MARKER_TIMEOUT = 30.0  # seconds after which a deletion marker counts as left by a crash
_ATTEMPTS = 20


class LeaseError(RuntimeError):
    """The output directory is held by another writer (or its lease cannot be taken); a one-line message."""


class LeaseStore(Protocol):
    """Where a lease record lives. ``expected`` is the exact record last read or written: an operation given it
    does nothing (and returns False) when the record has changed since."""

    def read(self) -> tuple[bytes, float] | None: ...  # the record and when it was last written; None: no lease
    def create(self, data: bytes) -> bool: ...  # False when a record exists
    def replace(self, expected: bytes, data: bytes) -> bool: ...
    def delete(self, expected: bytes) -> bool: ...


class FileLeaseStore:
    """A lease record as a file. Temporary files carry vlcurate's temporary mark, so that the cleanup of the next
    run removes what a crash left; links are never followed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def read(self) -> tuple[bytes, float] | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError:  # a link or something else that is not a record: unreadable, never followed
            try:
                return b"", os.lstat(self.path).st_mtime
            except FileNotFoundError:
                return None
        with open(fd, "rb") as handle:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return b"", info.st_mtime
            return handle.read(MAX_RECORD_BYTES + 1), info.st_mtime

    def create(self, data: bytes) -> bool:
        for attempt in range(3):
            tmp = self._temporary(data)
            try:
                os.link(tmp, self.path)  # atomic, and never replaces an existing record
                return True
            except FileExistsError:
                return False
            except FileNotFoundError:
                # The holder's start-up may remove a contender's temporary file (it carries the temporary mark).
                if attempt == 2 or not self.path.parent.is_dir():
                    raise
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV):
                    raise
                return self._create_exclusive(data)  # a filesystem without hard links
            finally:
                tmp.unlink(missing_ok=True)
        return False

    def replace(self, expected: bytes, data: bytes) -> bool:
        current = self.read()
        if current is None or current[0] != expected:
            return False
        for attempt in range(3):
            tmp = self._temporary(data)
            try:
                os.replace(tmp, self.path)  # in place: the record never disappears while it is renewed
                return True
            except FileNotFoundError:
                if attempt == 2:
                    raise
            finally:
                tmp.unlink(missing_ok=True)
        return False

    def delete(self, expected: bytes) -> bool:
        """Delete the record if it is still ``expected``. One process at a time deletes a given record: it holds
        a marker named after the record's digest (others wait for the outcome), checks the record, moves it aside
        (atomic) and checks it again; a record that changed meanwhile (renewed by a holder thought gone) is put
        back. Once the record is gone the marker has no use: a late contender finds no ``expected`` to move."""
        marker = self.path.with_name(f"{self.path.name}{TMP_MARK}{hashlib.sha256(expected).hexdigest()[:12]}")
        try:
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
        except FileExistsError:
            try:
                if time.time() - os.lstat(marker).st_mtime < MARKER_TIMEOUT:
                    return False  # another process is deleting this record
            except FileNotFoundError:
                return False
        try:
            current = self.read()
            if current is None or current[0] != expected:
                return False
            aside = self._temporary_name()
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return False
            try:
                moved = FileLeaseStore(aside).read()
                if moved is not None and moved[0] == expected:
                    return True
                try:
                    os.link(aside, self.path)  # renewed meanwhile: back in place
                except OSError:
                    pass
                return False
            finally:
                aside.unlink(missing_ok=True)
        finally:
            marker.unlink(missing_ok=True)

    def _temporary_name(self) -> Path:
        return self.path.with_name(f"{self.path.name}{TMP_MARK}{secrets.token_hex(6)}")

    def _temporary(self, data: bytes) -> Path:
        tmp = self._temporary_name()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with open(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return tmp

    def _create_exclusive(self, data: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            return False
        with open(fd, "wb") as handle:  # a reader may see it half-written: it counts as unreadable, not as free
            handle.write(data)
        return True


def lease_store(output: str | os.PathLike) -> LeaseStore:
    """The lease record of an output: a file in a local output, an object with conditional requests in an object
    store (``pipeline.storage.ObjectLeaseStore``)."""
    from pipeline.storage import ObjectStorage, is_remote

    if is_remote(output):
        return ObjectStorage(str(output)).lease_store(LEASE_PATH.as_posix())
    return FileLeaseStore(Path(output) / LEASE_PATH)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def pid_scope() -> str:
    """What makes a pid meaningful on this host (Linux: the boot and the pid namespace); empty where unknown."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (a zombie does not count)."""
    if pid <= 0:
        return True  # not a pid: unknown, so the heartbeat decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # exists, owned by someone else (or not a pid of this system: the heartbeat decides)
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _printable(value, limit: int = 200) -> str:
    text = str(value)[:limit]
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _stderr_warning(message: str) -> None:
    print(f"vlcurate: warning: {message}", file=sys.stderr, flush=True)


def parse_record(data: bytes) -> dict | None:
    """A lease record, or None when it is not one (empty, cut short, edited)."""
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    try:
        for name in ("host", "purpose", "token", "started", "heartbeat"):
            if not isinstance(record[name], str):
                return None
        if not isinstance(record["pid"], int):
            return None
        record["_started"] = datetime.fromisoformat(record["started"]).timestamp()
        record["_heartbeat"] = datetime.fromisoformat(record["heartbeat"]).timestamp()
    except (KeyError, ValueError, TypeError, OverflowError):
        return None
    return record


class OutputLease:
    """The lease on one output directory, as a context manager::

        with OutputLease(out_root, "run"):
            ...  # write the outputs

    ``acquire`` raises ``LeaseError`` when another live writer holds it; ``release`` deletes the record only while
    it still holds this lease's token. ``lost`` says why the lease was lost while held (None while it is not)."""

    def __init__(self, output: str | os.PathLike, purpose: str, *, store: LeaseStore | None = None,
                 timeout: float = LEASE_TIMEOUT, heartbeat: float = HEARTBEAT_INTERVAL,
                 warn: Callable[[str], None] = _stderr_warning):
        self.output = str(output)
        self.purpose = purpose
        self.store = store if store is not None else lease_store(output)
        self.timeout, self.heartbeat = timeout, heartbeat
        self.warn = warn
        self.host, self.pid, self.pid_scope = socket.gethostname(), os.getpid(), pid_scope()
        self.token = secrets.token_hex(16)
        self.record: dict | None = None
        self.lost: str | None = None
        self._written = b""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self.record is not None and self.lost is None

    def __enter__(self) -> OutputLease:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> OutputLease:
        if self.record is not None:
            raise RuntimeError("this lease is already held")
        taken_over = None
        for attempt in range(_ATTEMPTS):
            started = now_iso()
            record = {"vlcurate_lease": 1, "purpose": self.purpose, "host": self.host, "pid": self.pid,
                      "pid_scope": self.pid_scope, "started": started, "heartbeat": started, "token": self.token}
            data = _encode(record)
            try:
                if self.store.create(data):
                    break
                current = self.store.read()
            except OSError as exc:
                raise LeaseError(f"cannot take the lease on output directory {self.output} "
                                 f"({exc.strerror or exc}): check that it is a vlcurate output and writable") from None
            if current is None:
                continue  # released meanwhile
            content, modified = current
            holder = parse_record(content)
            reason = self.stale_reason(holder, modified)
            if reason is None:
                raise LeaseError(self._held_message(holder, modified))
            try:
                deleted = self.store.delete(content)  # only the record judged stale: a renewed one stays
            except OSError:
                deleted = False
            if deleted:
                taken_over = (holder, reason)
            else:
                time.sleep(0.05 * min(attempt + 1, 4))  # another process is taking it over: see who wins
        else:
            raise LeaseError(f"could not take the lease on output directory {self.output}: other processes keep "
                             "taking it; try again")
        self.record, self._written, self.lost = record, data, None
        if taken_over is not None:
            self.warn(f"took over output directory {self.output} from {self._describe(*taken_over)}")
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="vlcurate-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> bool:
        """Stop the heartbeat and delete the record if it is still this lease's; True when it was deleted."""
        if self.record is None:
            return False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.heartbeat))
            self._thread = None
        released = False
        if self.lost is None:
            try:
                released = self.store.delete(self._written)
            except OSError as exc:
                self.warn(f"could not release the lease on output directory {self.output} "
                          f"({exc.strerror or exc}); the next run takes it over once it is stale")
            else:
                if not released:
                    self._lose()
        self.record = None
        return released

    def stale_reason(self, holder: dict | None, modified: float, now: float | None = None) -> str | None:
        """Why a lease record no longer protects anyone, or None while its holder may be alive."""
        now = time.time() if now is None else now
        if holder is None:
            age = now - modified
            return f"an unreadable lease record, unchanged for {_duration(age)}" if age > self.timeout else None
        if (holder["host"] == self.host and holder.get("pid_scope", "") == self.pid_scope
                and not pid_alive(holder["pid"])):
            return f"process {holder['pid']} has exited"
        age = now - holder["_heartbeat"]
        if age > self.timeout:
            return f"no heartbeat for {_duration(age)}"
        return None

    def _held_message(self, holder: dict | None, modified: float) -> str:
        now = time.time()
        if holder is None:
            who = (f"an unreadable lease record ({_printable(self.store)}, last changed {_duration(now - modified)} "
                   "ago)")
        else:
            who = (f"another vlcurate {_printable(holder['purpose'], 40)} ({self._holder(holder)}, last heartbeat "
                   f"{_duration(now - holder['_heartbeat'])} ago)")
        return (f"output directory {self.output} is in use by {who}: wait for it to finish or use another output "
                f"directory; a lease whose holder has exited is taken over (from another host after "
                f"{_duration(self.timeout)} without heartbeat)")

    def _describe(self, holder: dict | None, reason: str) -> str:
        if holder is None:
            return reason
        return f"a vlcurate {_printable(holder['purpose'], 40)} that is gone ({self._holder(holder)}: {reason})"

    @staticmethod
    def _holder(holder: dict) -> str:
        since = datetime.fromtimestamp(holder["_started"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"host {_printable(holder['host'], 100)}, pid {holder['pid']}, since {since}"

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            if self.record is None:
                return
            record = {**self.record, "heartbeat": now_iso()}
            data = _encode(record)
            try:
                renewed = self.store.replace(self._written, data)
            except OSError:
                continue  # a passing storage error: the next beat tries again
            if not renewed:
                self._lose()
                return
            self.record, self._written = record, data

    def _lose(self) -> None:
        """The record is no longer this lease's: another process took it over (this one was judged gone)."""
        try:
            current = self.store.read()
        except OSError:
            current = None
        holder = parse_record(current[0]) if current else None
        if current is None:
            self.lost = f"the lease on output directory {self.output} was removed by another process"
        else:
            now_held_by = f" (now held by {self._holder(holder)})" if holder else ""
            self.lost = f"the lease on output directory {self.output} was taken over by another process{now_held_by}"
        self.warn(f"{self.lost}; outputs written since may mix with that process's")


def _encode(record: dict) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode("utf-8")
