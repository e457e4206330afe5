"""Decoder processes: compressed pixel data decoded outside the worker, under a memory limit.

``node.decode`` parses every compressed frame's declared size before a decoder runs, but a
file the parser misreads (a decoy JPEG 2000 SIZ in a JP2 box ahead of the real codestream, a
decoder that honours another marker than ours) would still let the decoder allocate what the
real codestream claims, in the worker. ``DecoderPool`` hands each compressed image to a child
process (``node.decode_child``) whose address space is capped at its start-up size plus
``[node] decode_memory_mb``. Over the limit the child fails or dies, and the worker raises
``DecodeMemoryError`` or ``DecodeError`` naming the limit; the next image gets a new child.

Children are started on first use and kept for the next image, one per concurrent caller
(one per analysis worker thread); one that failed for memory, died or sent something
unexpected is ended and replaced. The array comes back over a pipe straight into an array
allocated here after its shape and type were checked against the image's header, so the
child cannot make the worker allocate more than the pixel budget allows.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import weakref
from pathlib import Path
from typing import Any, cast

import numpy as np
import structlog
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.tag import Tag

from node.decode_child import write_frame
from node.errors import DecodeError, DecodeMemoryError, NodeError

log = structlog.stdlib.get_logger("node.decode_pool")

DECODE_MEMORY_MB = 2048.0
"""Memory one decoder process may take beyond its start-up size: ``[node] decode_memory_mb``."""

_MAX_HEADER = 1 << 20
_PIXEL_DATA = (Tag(0x7FE0, 0x0001), Tag(0x7FE0, 0x0002), Tag(0x7FE0, 0x0010))
"""Extended Offset Table (and its lengths) and Pixel Data."""
_SOURCE_ROOT = str(Path(__file__).resolve().parents[1])


class _Child:
    """One decoder process and its pipes."""

    def __init__(self, memory_mb: float) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, (_SOURCE_ROOT, os.getenv("PYTHONPATH")))),
            "OPENBLAS_NUM_THREADS": "1",  # numpy's thread pool would reserve address space
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "node.decode_child", str(memory_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        self.requests = cast(io.BufferedWriter, self.process.stdin)  # bufsize -1: buffered
        self.answers = cast(io.BufferedReader, self.process.stdout)
        _widen(self.answers)
        ready = self.header()
        if ready is None or not ready.get("ready"):
            why = self.exit_status() if ready is None else str(ready.get("error"))
            self.end()
            raise NodeError(f"the decoder process did not start: {why}")
        vm = ready.get("vm_bytes")
        self.start_vm = vm if isinstance(vm, int) else 0
        self.grown = 0
        """How much the child's address space grew since start, at its last answer."""

    def header(self) -> dict[str, Any] | None:
        """The next JSON header; None when the child ended or sent something else."""
        payload = _read_bounded(self.answers, _MAX_HEADER)
        if payload is None:
            return None
        try:
            value = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        return value if isinstance(value, dict) else None

    def exit_status(self) -> str:
        """How the child ended, in words (it is waited for)."""
        try:
            code = self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            return "still running"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit status {code}"

    def end(self) -> None:
        _end(self.process)


def _widen(pipe: io.BufferedReader) -> None:
    """Give the answer pipe 1 MiB (Linux's default cap for users; 64 KiB otherwise): an image
    then crosses in a few writes instead of a hundred switches between the processes."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or a lower cap: as it is
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)


def _end(process: subprocess.Popen[bytes]) -> None:
    """Kill a child and reap it (also what the pool's finalizer does at exit)."""
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            stream.close()
    if process.poll() is None:
        process.kill()
    process.wait()


def _read_bounded(stream: io.BufferedReader, limit: int) -> bytes | None:
    head = stream.read(8)
    if len(head) < 8:
        return None
    length = int.from_bytes(head, "big")
    if length > limit:
        return None
    payload = stream.read(length)
    return payload if len(payload) == length else None


def _read_into(stream: io.BufferedReader, array: np.ndarray[Any, Any]) -> bool:
    """Fill ``array`` from the next frame, which must be exactly its size."""
    head = stream.read(8)
    if len(head) < 8 or int.from_bytes(head, "big") != array.nbytes:
        return False
    view = array.data.cast("B")
    at = 0
    while at < array.nbytes:
        got = stream.readinto(view[at:])
        if not got:
            return False
        at += got
    return True


def request_of(ds: Dataset) -> bytes:
    """What the child needs to decode ``ds``: transfer syntax, Image Pixel module (group
    0028), pixel data; no patient or study values."""
    part = Dataset()
    part.file_meta = FileMetaDataset()
    part.file_meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
    pixel_module = [t for t in ds.keys() if t.group == 0x0028]  # noqa: SIM118 - a Dataset iterates elements
    for tag in pixel_module + [t for t in _PIXEL_DATA if t in ds]:
        part[tag] = ds[tag]  # converted from the file's encoding here
    return pickle.dumps(part, protocol=pickle.HIGHEST_PROTOCOL)


def _checked(
    header: dict[str, Any], most_values: int
) -> tuple[tuple[int, ...], np.dtype[Any]] | None:
    """The answer's shape and type if they describe at most ``most_values`` numbers."""
    try:
        shape = tuple(int(n) for n in header["shape"])
        dtype = np.dtype(str(header["dtype"]))
    except (KeyError, TypeError, ValueError):
        return None
    if dtype.kind not in "biuf" or dtype.itemsize > 8 or not 2 <= len(shape) <= 3:
        return None
    if min(shape) < 1 or math.prod(shape) > most_values:
        return None
    return shape, dtype


def _log_warnings(header: dict[str, Any]) -> None:
    """The child's warnings (pydicom's, Pillow's) in the node's log, as one line."""
    said = header.get("warnings")
    if isinstance(said, list) and said:
        log.warning("decoder_warned", warnings=[": ".join(map(str, w)) for w in said])


class DecoderPool:
    """Decoder processes limited to ``memory_mb`` each, started on demand and reused."""

    def __init__(self, memory_mb: float = DECODE_MEMORY_MB) -> None:
        self.memory_mb = memory_mb
        self._idle: list[_Child] = []
        self._lock = threading.Lock()
        self._all: set[subprocess.Popen[bytes]] = set()
        self._finalizer = weakref.finalize(self, _end_all, self._all)

    @property
    def pids(self) -> list[int]:
        """Process ids of the running decoder processes (for operators and tests)."""
        with self._lock:
            return sorted(p.pid for p in self._all if p.poll() is None)

    @property
    def limit(self) -> str:
        """The limit in words, for messages."""
        return f"the {self.memory_mb:g} MB decode memory limit ([node] decode_memory_mb)"

    def first_frame(self, ds: Dataset, *, most_values: int) -> np.ndarray[Any, Any]:
        """Decode ``ds``'s first frame in a decoder process; ``most_values`` bounds the array
        it may send back (rows × columns × samples of the header). Raises ``DecodeError``."""
        request = request_of(ds)
        child = self._take()
        try:
            answer = self._ask(child, request, most_values)
        except BaseException:
            self._retire(child)
            raise
        self._give_back(child)
        if isinstance(answer, DecodeError):
            raise answer
        return answer

    def _ask(
        self, child: _Child, request: bytes, most_values: int
    ) -> np.ndarray[Any, Any] | DecodeError:
        """The decoded array, or the decode error the child reported (it can go on); raises
        ``DecodeError`` when the child cannot go on."""
        try:
            write_frame(child.requests, request)
            child.requests.flush()
        except OSError:
            pass  # the child died: its exit status is read below
        header = child.header()
        if header is None:
            raise DecodeError(
                f"the decoder process ended ({child.exit_status()}) while decoding the pixel "
                f"data, under {self.limit}"
            )
        _log_warnings(header)
        vm = header.get("vm_bytes")
        child.grown = vm - child.start_vm if isinstance(vm, int) else 0
        if "error" in header:
            error = " ".join(str(header["error"]).split())  # one line, for the stored reason
            if header.get("memory"):
                raise DecodeMemoryError(f"decoding needs more than {self.limit}: {error}")
            return DecodeError(f"cannot decode the pixel data (under {self.limit}): {error}")
        shape_type = _checked(header, most_values)
        if shape_type is None:
            raise DecodeError("the decoder process sent an answer that does not fit the header")
        pixels = np.empty(*shape_type)
        if not _read_into(child.answers, pixels):
            raise DecodeError(
                f"the decoder process ended ({child.exit_status()}) while sending the pixel "
                f"data, under {self.limit}"
            )
        return pixels

    def _take(self) -> _Child:
        """An idle child, or a new one; one that died while idle is replaced, not blamed."""
        with self._lock:
            idle = self._idle.pop() if self._idle else None
        if idle is not None and idle.process.poll() is None:
            return idle
        if idle is not None:
            self._retire(idle)
            return self._take()
        child = _Child(self.memory_mb)
        with self._lock:
            self._all.add(child.process)
        return child

    def _give_back(self, child: _Child) -> None:
        """Keep the child for the next image, unless its heap kept a quarter of the limit."""
        if child.grown > self.memory_mb * 1024 * 1024 / 4:
            self._retire(child)
            return
        with self._lock:
            self._idle.append(child)

    def _retire(self, child: _Child) -> None:
        with self._lock:
            self._all.discard(child.process)
        child.end()

    def close(self) -> None:
        """End the idle decoder processes (the pool starts new ones when asked again)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for child in idle:
            self._retire(child)

    def __enter__(self) -> DecoderPool:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _end_all(processes: set[subprocess.Popen[bytes]]) -> None:
    """The pool's finalizer (at garbage collection or exit): no child outlives it."""
    for process in list(processes):
        _end(process)
