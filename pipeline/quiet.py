"""What the terminal shows: vlcurate's own lines; Ray's internals stay in Ray's log files.

Ray's native core writes its warning and error lines (``[2026-01-01 12:00:00,123 E 4242 4242] core_worker.cc:...``)
straight to the process's standard error, besides its log files under the session directory, and Ray's Python
modules log internal warnings the same way. ``RayLinesFiltered`` puts a pipe in front of file descriptor 2 for the
duration of a command and forwards everything except those lines, so a successful run prints only stage headers,
progress bars, tables and vlcurate's own warnings. Workers' output is not forwarded to the driver at all in quiet
mode (``ray_driver_logging``). ``VLCURATE_VERBOSE=1`` (or ``vlcurate --verbose``) turns all of this off.
"""

from __future__ import annotations

import os
import re
import sys
import threading

VERBOSE_ENV = "VLCURATE_VERBOSE"

# A line of Ray's native logging ("[date time,ms L pid tid] file.cc:line: ...") or of its Python logging
# ("date time,ms<TAB>LEVEL file.py:line -- ...").
RAY_LINE = re.compile(
    rb"^(?:\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] [\w./-]+\.(?:cc|h):\d+:"
    rb"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\t(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w./-]+\.py:\d+ -- )"
)
# An unfinished piece that may still become such a line is held back until its end arrives.
MAY_BECOME_RAY_LINE = re.compile(rb"^[\[\d]")
SEGMENT = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")  # text up to and including its line end, or a tail


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def ray_driver_logging() -> dict:
    """``ray.init`` settings for the driver: in quiet mode, workers' output stays in Ray's log files."""
    return {} if verbose() else {"log_to_driver": False}


class RayLinesFiltered:
    """A context in which Ray's log lines written to standard error are dropped and the rest is forwarded."""

    def __init__(self):
        self._saved_fd: int | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RayLinesFiltered":
        if verbose():
            return self
        try:
            sys.stderr.flush()
            read_end, write_end = os.pipe()
            self._saved_fd = os.dup(2)
        except OSError:  # no file descriptor 2 to filter (embedded use): leave standard error alone
            return self
        os.dup2(write_end, 2)
        os.close(write_end)
        self._thread = threading.Thread(target=self._forward, args=(read_end, self._saved_fd),
                                        name="vlcurate-stderr", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._saved_fd is None:
            return
        sys.stderr.flush()
        os.dup2(self._saved_fd, 2)  # the pipe's last write end closes: the forwarder sees its end and stops
        if self._thread is not None:
            self._thread.join(timeout=5)
        os.close(self._saved_fd)
        self._saved_fd = None

    @staticmethod
    def _forward(read_end: int, target: int) -> None:
        held = b""
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                held = _write_kept(held + chunk, target, final=False)
            _write_kept(held, target, final=True)


def _write_kept(data: bytes, target: int, final: bool) -> bytes:
    """Write the pieces of ``data`` that are not Ray's lines; return an unfinished tail that must wait."""
    kept = []
    tail = b""
    for match in SEGMENT.finditer(data):
        piece = match.group()
        finished = piece.endswith((b"\n", b"\r"))
        if not finished and not final and MAY_BECOME_RAY_LINE.match(piece) and len(piece) < 4096:
            tail = piece
            break
        if not RAY_LINE.match(piece):
            kept.append(piece)
    if kept:
        payload = b"".join(kept)
        while payload:
            try:
                written = os.write(target, payload)
            except OSError:
                return tail
            payload = payload[written:]
    return tail
