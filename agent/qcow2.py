"""qcow2 headers in Python: reading one, and writing an empty image, without a process per file.

The checker looks at every volume of a repository; spawning qemu-img for 10,000 volumes would take
a minute, reading 4 KiB of each takes a fraction of a second. Only qcow2 headers are parsed: a raw
volume's content is guest data and is never probed.

Thin creates and snapshots make an *empty* qcow2 file, with or without a backing file. Half of a
``qemu-img create`` (6-8 ms here) is starting the qemu-img process, which alone put every thin
create past its target of 1.5x a bare ``qemu-img create``. An empty image is four fixed
structures, so Strata writes the very bytes qemu-img 7.2 writes for ``-f qcow2 -o
compat=1.1,lazy_refcounts=off`` (64 KiB clusters, 16-bit refcounts; the layout of
docs/interop/qcow2.txt): header, refcount table, one refcount block, an all-zero L1 table.
``tests/test_qcow2.py`` compares them byte for byte with the installed qemu-img's. Everything
that moves data stays with qemu-img.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import stat
import struct
import time

from agent import errors, fileio

MAGIC = b"QFI\xfb"
_BACKING_FORMAT_EXT = 0xE2792ACA
_FEATURE_NAMES_EXT = 0x6803F857
_HEADER_READ = 4096

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
_REFCOUNT_ORDER = 4  # 16-bit refcounts
_V3_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")  # up to header_length, then 8 bytes below
_V3_HEADER_LENGTH = 112  # 104 + compression type (1 byte) + padding to 8
# Where qemu-img puts the structures of a new image: cluster 0 header, 1 refcount table, 2 the
# one refcount block, 3 onwards the L1 table.
_REFCOUNT_TABLE = 1 * CLUSTER
_REFCOUNT_BLOCK = 2 * CLUSTER
_L1_TABLE = 3 * CLUSTER
_L2_COVERS = (CLUSTER // 8) * CLUSTER  # one L2 table maps 8,192 clusters: 512 MiB
_MAX_L1_BYTES = 32 << 20  # qemu's limit on the L1 table: 2 PiB of virtual size
_MAX_BACKING_NAME = 1023  # qemu refuses longer backing file names
# The feature-name table qemu writes so that tools can name a feature bit they do not know:
# (type: 0 incompatible, 1 compatible, 2 autoclear; bit; name).
_FEATURE_NAMES = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)


# Incompatible feature bit 2: the guest data lives in another file the header names. Strata never
# makes one; a planted one could make qemu read or write any file: such a volume is refused.
EXTERNAL_DATA_FILE = 1 << 2


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    version: int
    size: int
    backing: str | None
    backing_format: str | None
    incompatible_features: int = 0


def _open_regular(path: str) -> io.BufferedReader:
    """Open a file for reading without following a symlink and without blocking on a FIFO;
    OSError unless it is a regular file (planted files are never followed)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def is_qcow2(path: str) -> bool:
    with _open_regular(path) as f:
        return f.read(4) == MAGIC


# Headers read lately, by what identifies the file's content: a status poll reads the header
# of every layer of a chain, which is most of its cost. Trusted only for a file whose mtime and
# ctime are more than a second old: any change after it was read gives a newer time, even on a
# file system whose timestamps are coarse.
_HEADERS: dict[tuple[int, int, int, int, int], Header | None] = {}
_HEADERS_MAX = 1 << 19  # a repository of 250,000 two-layer images
_SETTLED = 1_000_000_000  # ns


def read_header_cached(path: str) -> Header | None:
    """``read_header``, answered from memory while the file has not changed since."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        return read_header(path)  # the error read_header gives
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _HEADERS:
        return _HEADERS[key]
    header = read_header(path)
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _SETTLED:
        if len(_HEADERS) >= _HEADERS_MAX:
            _HEADERS.clear()
        _HEADERS[key] = header
    return header


def read_header(path: str) -> Header | None:
    """The header of a qcow2 file, or None when the file is not qcow2 (or too short to be one).
    OSError when it is not a regular file (a symlink is never followed)."""
    with _open_regular(path) as f:
        head = f.read(_HEADER_READ)
        if len(head) < 72 or head[:4] != MAGIC:
            return None
        version, backing_off, backing_len = struct.unpack(">IQI", head[4:20])
        if version >= 3 and len(head) < 104:
            return None  # cut inside its header: not a qcow2 qemu would open
        (size,) = struct.unpack(">Q", head[24:32])
        incompatible = struct.unpack(">Q", head[72:80])[0] if version >= 3 and len(head) >= 80 \
            else 0
        backing = None
        if backing_off and backing_len:
            if backing_len > _MAX_BACKING_NAME:
                raw = b"\0" * backing_len  # qemu refuses it too; never a real name
            elif backing_off + backing_len > len(head):
                f.seek(backing_off)
                raw = f.read(backing_len)
            else:
                raw = head[backing_off : backing_off + backing_len]
            backing = raw.decode("utf-8", errors="replace")
    return Header(version, size, backing, _backing_format(head, version), incompatible)


def _backing_format(head: bytes, version: int) -> str | None:
    offset = struct.unpack(">I", head[100:104])[0] if version >= 3 else 72
    while offset + 8 <= len(head):
        ext_type, ext_len = struct.unpack(">II", head[offset : offset + 8])
        if ext_type == 0:
            return None
        if ext_type == _BACKING_FORMAT_EXT:
            return head[offset + 8 : offset + 8 + ext_len].decode("ascii", errors="replace")
        offset += 8 + ((ext_len + 7) & ~7)
    return None


def _extension(ext_type: int, payload: bytes) -> bytes:
    pad = -len(payload) % 8
    return struct.pack(">II", ext_type, len(payload)) + payload + b"\0" * pad


def _feature_names() -> bytes:
    return b"".join(struct.pack(">BB46s", kind, bit, name.encode())
                    for kind, bit, name in _FEATURE_NAMES)


def _check_backing(path: str, fmt: str) -> None:
    """Refuse to write an overlay on a backing file that cannot be read, as qemu-img create
    does: an image on a missing or foreign base would read wrong, and look fine."""
    try:
        with _open_regular(path) as f:
            magic = f.read(len(MAGIC))
    except OSError as e:
        raise errors.ImageBroken(f"cannot open backing file {path}: {e.strerror}") from e
    if fmt == "qcow2" and magic != MAGIC:
        raise errors.ImageBroken(f"backing file {path} is not a qcow2 image")


def create(path: str, size: int, backing: str | None = None,
           backing_format: str | None = None) -> None:
    """Write an empty qcow2 image of virtual ``size`` bytes at ``path`` (created or truncated),
    backed by ``backing`` (a reference as qemu resolves it: relative to the image's directory)
    in ``backing_format``, which must be there and readable. The caller fsyncs it."""
    if size <= 0 or size % 512:
        raise errors.InvalidArgument(f"qcow2 size must be a positive multiple of 512, got {size}")
    l1_entries = -(-size // _L2_COVERS)
    if l1_entries * 8 > _MAX_L1_BYTES:
        raise errors.InvalidArgument(f"qcow2 size {size} is larger than 64 KiB clusters allow")
    # At most 3 + 512 clusters, all counted by the one refcount block (it counts 32,768).
    used_clusters = 3 + -(-(l1_entries * 8) // CLUSTER)

    extensions = b""
    name = b""
    if backing is not None:
        name = backing.encode()
        if not name or len(name) > _MAX_BACKING_NAME:
            raise errors.InvalidArgument(f"backing reference {backing!r} must be 1-1023 bytes")
        _check_backing(os.path.join(os.path.dirname(path), backing), backing_format or "qcow2")
        extensions += _extension(_BACKING_FORMAT_EXT, (backing_format or "qcow2").encode())
    extensions += _extension(_FEATURE_NAMES_EXT, _feature_names()) + b"\0" * 8  # end mark
    name_offset = _V3_HEADER_LENGTH + len(extensions)
    header = _V3_HEADER.pack(
        MAGIC, 3,
        name_offset if name else 0, len(name),
        CLUSTER_BITS, size,
        0,  # no encryption
        l1_entries, _L1_TABLE,
        _REFCOUNT_TABLE, 1,  # refcount table clusters
        0, 0,  # no internal snapshots
        0, 0, 0,  # incompatible, compatible, autoclear features: none
        _REFCOUNT_ORDER, _V3_HEADER_LENGTH,
    ) + b"\0" * 8  # compression type zlib, padding
    cluster0 = header + extensions + name
    refcounts = struct.pack(f">{used_clusters}H", *([1] * used_clusters))
    # One buffer, written whole, as qemu-img writes it: full header, refcount table and
    # refcount block clusters, then the zero L1 table, so the same blocks are allocated now
    # and none is left for a guest's first write to find on a full file system.
    image = bytearray(_L1_TABLE + l1_entries * 8)
    image[0:len(cluster0)] = cluster0
    image[_REFCOUNT_TABLE:_REFCOUNT_TABLE + 8] = struct.pack(">Q", _REFCOUNT_BLOCK)
    image[_REFCOUNT_BLOCK:_REFCOUNT_BLOCK + len(refcounts)] = refcounts
    fileio.write_file(path, image)  # 0644, as qemu-img makes it
