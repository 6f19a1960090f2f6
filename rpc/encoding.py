"""An answer's bytes: strict JSON, and large answers in pieces that let the hub run.

Strict: ``allow_nan=False`` (NaN and Infinity are not JSON) and UTF-8 without ``ensure_ascii``, so
that a lone surrogate fails to encode instead of going out as a ``\\ud800`` escape strict parsers
refuse.
"""

from __future__ import annotations

import json
from typing import Any

# Answers estimated up to this size are encoded on the hub (64 KiB is ~0.5 ms of json.dumps
# here); larger ones on a thread, in pieces of about this size.
INLINE_BYTES = 64 << 10
PIECE_BYTES = 64 << 10


def encode(obj: Any) -> bytes:
    """Strict JSON: ValueError for NaN or infinity, and (UnicodeEncodeError) for a lone
    surrogate, which ensure_ascii would have escaped into text strict parsers refuse."""
    return json.dumps(obj, allow_nan=False, ensure_ascii=False).encode()


def small(obj: Any) -> bool:
    """Whether ``obj`` is small enough to encode on the hub (about INLINE_BYTES at most)."""
    return estimate(obj, INLINE_BYTES) <= INLINE_BYTES


def estimate(obj: Any, cap: int) -> int:
    """Roughly the size of ``obj`` in JSON, counted until it passes ``cap``."""
    size = 0
    stack = [obj]
    while stack and size <= cap:
        item = stack.pop()
        if isinstance(item, str):
            size += len(item) + 2
        elif isinstance(item, dict):
            size += 2
            for key, child in item.items():
                size += (len(key) if isinstance(key, str) else 8) + 4
                stack.append(child)
        elif isinstance(item, list | tuple):
            size += 2 + len(item)
            stack.extend(item)
        else:
            size += 8
    return size


class _Full(Exception):
    pass


def in_pieces(obj: Any, limit: int) -> list[bytes] | None:
    """``obj`` as strict JSON (as ``encode`` gives it) in chunks, or None as soon as it passes
    ``limit`` bytes: a too large answer is never built whole. Run on a thread: json's C encoder
    holds the GIL for all of one call (measured: a 12 MB dumps on a thread stopped the main
    thread for the whole 110 ms), so containers larger than PIECE_BYTES are split, and between
    pieces the hub gets the GIL back."""
    out = Chunks()
    part: list[str] = []
    part_size = 0

    def add(text: str) -> None:
        nonlocal part, part_size
        part.append(text)
        part_size += len(text)
        if out.size + part_size > limit:
            raise _Full()
        if part_size >= PIECE_BYTES:
            out.add("".join(part).encode())  # a lone surrogate fails here, as in encode()
            part, part_size = [], 0

    def piece(item: Any) -> None:
        if isinstance(item, dict) and item and estimate(item, PIECE_BYTES) > PIECE_BYTES:
            add("{")
            for i, (key, child) in enumerate(item.items()):
                add((", " if i else "") + json.dumps(_json_key(key), ensure_ascii=False) + ": ")
                piece(child)
            add("}")
        elif isinstance(item, list | tuple) and item and estimate(item, PIECE_BYTES) > PIECE_BYTES:
            add("[")
            # Runs of items in one json.dumps each (one call per item, and a size estimate of
            # each, cost more than the encoding: a listing of 100,000 images), as many as make
            # about a piece: the run's length follows the sizes the last run gave.
            i, run = 0, 16
            while i < len(item):
                first = item[i]
                if estimate(first, PIECE_BYTES) > PIECE_BYTES:  # a big one: split it
                    add(", " if i else "")
                    piece(first)
                    i += 1
                    continue
                text = json.dumps(item[i:i + run], allow_nan=False, ensure_ascii=False)
                add((", " if i else "") + text[1:-1])
                i += run
                run = max(1, min(4096, run * PIECE_BYTES // max(1, len(text))))
            add("]")
        else:
            add(json.dumps(item, allow_nan=False, ensure_ascii=False))

    try:
        piece(obj)
    except _Full:
        return None
    out.add("".join(part).encode())
    return out.done() if out.size <= limit else None


class Chunks:
    """Bytes to send, gathered into chunks of about PIECE_BYTES: never one join of a whole
    answer (joining 42 MB held the hub for 80 ms here), nor one send per small answer."""

    def __init__(self) -> None:
        self.size = 0
        self._chunks: list[bytes] = []
        self._part: list[bytes] = []
        self._part_size = 0

    def add(self, *pieces: bytes) -> None:
        for p in pieces:
            self._part.append(p)
            self._part_size += len(p)
            self.size += len(p)
        if self._part_size >= PIECE_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._part:
            self._chunks.append(b"".join(self._part))
            self._part, self._part_size = [], 0

    def done(self) -> list[bytes]:
        self._flush()
        return self._chunks


def _json_key(key: Any) -> str:
    # What json.dumps makes of a dict key.
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, bool | int | float):
        return json.dumps(key, allow_nan=False)
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")
