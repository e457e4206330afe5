"""The decoder process: compressed pixel data → the first frame's array, under a memory limit.

``node.decode_pool`` runs it as ``python -m node.decode_child <memory_mb>``. It imports
pydicom and its pixel decoders, then caps its own address space (``RLIMIT_AS``, soft and hard)
at its size after start-up plus ``memory_mb``, says it is ready and answers requests until its
input closes. A decoder that asks for more than the limit gets a failed allocation (a
``MemoryError`` in Python, an error code in C) or the process dies; the worker's memory is
never touched.

On both pipes a frame is an 8-byte big-endian length and that many bytes. Parent → child: a
pickled ``Dataset`` holding only what decoding reads (transfer syntax, Image Pixel module,
pixel data). Child → parent: a JSON header, ``{"ready", "limit_bytes", "vm_bytes"}`` once at
start, then per request ``{"shape", "dtype", "vm_bytes", "warnings"}`` followed by a frame of
the array's raw bytes, or ``{"error", "memory", "vm_bytes", "warnings"}``. The parent never
unpickles what comes back.

Only the standard library, numpy and pydicom are imported here (and the ``node`` package's
``__init__``), never ``pipeline``: its model runtime would add to every decoder process's
start-up size and time.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import resource
import struct
import sys
import warnings
from typing import IO, Any, cast

import numpy as np
from pydicom import Dataset, uid
from pydicom.pixels.decoders.base import get_decoder

_LENGTH = struct.Struct(">Q")
_MAX_WARNINGS = 20


def first_frame(ds: Dataset) -> np.ndarray[Any, Any]:
    """The stored values of the first frame as pydicom decodes them (YBR as RGB), contiguous.

    The same function runs in this process and, for uncompressed data, in the worker."""
    pixels = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1 or (pixels.ndim == 3 and samples == 1) or pixels.ndim == 4:
        pixels = pixels[0]
    return np.ascontiguousarray(pixels)


def address_space() -> int | None:
    """This process's current address space (VmSize) in bytes; None where /proc has none."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def read_frame(stream: IO[bytes]) -> bytes | None:
    """One frame's payload; None at a clean end of input."""
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(head)
    payload = stream.read(length)
    if len(payload) < length:
        return None
    return payload


def write_frame(stream: IO[bytes], payload: bytes | memoryview) -> None:
    stream.write(_LENGTH.pack(len(payload) if isinstance(payload, bytes) else payload.nbytes))
    stream.write(payload)


def _load_decoders() -> None:
    """Let pydicom find its decoder plugins now, before the limit (their code is mapped)."""
    for syntax in uid.AllTransferSyntaxes:
        try:
            get_decoder(syntax).is_available  # noqa: B018 - the property imports the plugins
        except NotImplementedError:  # pydicom has no decoder for this one
            continue


def _limit(memory_mb: float) -> int:
    """Cap the address space at its current size plus ``memory_mb`` (within any hard limit
    inherited from the worker); returns the limit in bytes."""
    now = address_space() or 0
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = now + int(memory_mb * 1024 * 1024)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return limit


class _PluginFailures(logging.Handler):
    """The exception types of the decoder plugins that failed: pydicom logs each one and
    raises a ``RuntimeError`` naming only their messages (a ``MemoryError`` has none)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.types: list[type[BaseException]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[0] is not None:
            self.types.append(record.exc_info[0])


def _next_request(source: IO[bytes]) -> Dataset | None:
    """The next request's dataset (its bytes freed at once); None at the end of input."""
    payload = read_frame(source)
    return None if payload is None else cast(Dataset, pickle.loads(payload))


def _decode(ds: Dataset) -> tuple[np.ndarray[Any, Any] | None, dict[str, Any]]:
    """The first frame, or None and the error header (``memory``: a decoder ran out)."""
    failures = _PluginFailures()
    logging.getLogger("pydicom").addHandler(failures)
    try:
        return first_frame(ds), {}
    except MemoryError as exc:
        return None, {"error": f"MemoryError: {exc}", "memory": True}
    except Exception as exc:  # the decoders raise many unrelated types: report them all
        if any(issubclass(t, MemoryError) for t in failures.types):
            plugins = ", ".join(t.__name__ for t in failures.types)
            return None, {"error": f"the decoder plugins failed ({plugins})", "memory": True}
        return None, {"error": f"{type(exc).__name__}: {exc}", "memory": False}
    finally:
        logging.getLogger("pydicom").removeHandler(failures)


def _answer(ds: Dataset, out: IO[bytes]) -> bool:
    """Decode one request and write the answer; False when this process should end."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pixels, header = _decode(ds)
    said = [[type(w.message).__name__, str(w.message)] for w in caught[:_MAX_WARNINGS]]
    facts = {"vm_bytes": address_space(), "warnings": said}
    if pixels is None:
        write_frame(out, json.dumps({**header, **facts}).encode())
        out.flush()
        return not header["memory"]  # after running out, a fresh process takes over
    meta = {"shape": list(pixels.shape), "dtype": pixels.dtype.str, **facts}
    write_frame(out, json.dumps(meta).encode())
    write_frame(out, pixels.data.cast("B"))
    out.flush()
    return True


def main() -> None:
    """Serve decode requests on the protocol pipes until the input ends."""
    memory_mb = float(sys.argv[1])
    # The protocol keeps fds 0 and 1; anything a library prints goes to stderr instead.
    source = os.fdopen(os.dup(0), "rb")
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    # pydicom logs each failed plugin with its traceback; the parent's DecodeError names them
    # all, so those records go to ``_PluginFailures`` only, never to the shared stderr.
    logging.getLogger("pydicom").propagate = False
    try:
        _load_decoders()
        started = address_space()
        ready: dict[str, Any] = {
            "ready": True,
            "limit_bytes": _limit(memory_mb),
            "vm_bytes": started,
        }
    except (OSError, ValueError, ImportError) as exc:  # said to the parent, which raises
        ready = {"ready": False, "error": f"{type(exc).__name__}: {exc}"}
    write_frame(out, json.dumps(ready).encode())
    out.flush()
    if not ready["ready"]:
        return
    while True:
        ds = _next_request(source)  # a request too big for the limit ends this process
        if ds is None or not _answer(ds, out):
            break
        del ds  # with its pixel data and the array pydicom keeps, before the next one


if __name__ == "__main__":
    main()
