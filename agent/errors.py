"""The one error base of Strata.

Every error a client may see is a subclass of ``Error`` with a stable numeric ``code`` and ``name``.
The codes are part of the API and listed in ``rpc/openrpc.json``; a test keeps the two in step.
"""

from __future__ import annotations

from typing import Any


class Error(Exception):
    code = 1000
    name = "StrataError"

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def __str__(self) -> str:
        return self.message


class InvalidArgument(Error):
    """A value that passes the schema but makes no sense here (wrong kind, size too small...)."""

    code = 1001
    name = "InvalidArgument"


class RequestIdReused(Error):
    """options.requestId was already used for a call with other params, or another method."""

    code = 1010
    name = "RequestIdReused"


class RepositoryNotConnected(Error):
    code = 1100
    name = "RepositoryNotConnected"


class RepositoryAlreadyConnected(Error):
    code = 1101
    name = "RepositoryAlreadyConnected"


class RepositoryNotFormatted(Error):
    code = 1102
    name = "RepositoryNotFormatted"


class RepositoryLocked(Error):
    code = 1103
    name = "RepositoryLocked"


class RepositoryNotEmpty(Error):
    code = 1104
    name = "RepositoryNotEmpty"


class UnsupportedFormat(Error):
    code = 1105
    name = "UnsupportedFormat"


class RepositoryUnavailable(Error):
    """The repository's file system fails (EIO, read-only, frozen, hung): only calls about
    it get this, at once or within the configured bound; the others go on answering."""

    code = 1106
    name = "RepositoryUnavailable"


class RepositoryUnsafe(Error):
    """The storage is set up so that another host could read a record's old content: the
    message names the setting and the command that fixes it; nothing stays mounted."""

    code = 1107
    name = "RepositoryUnsafe"


class LockspaceNotJoined(Error):
    """A data-changing call on a shared repository whose lockspace this host has not joined
    (still joining, or out of it after its storage stopped answering): reads still work."""

    code = 1110
    name = "LockspaceNotJoined"


class ImageNotFound(Error):
    code = 1200
    name = "ImageNotFound"


class ImageBusy(Error):
    code = 1201
    name = "ImageBusy"


class WrongImageKind(Error):
    code = 1202
    name = "WrongImageKind"


class ImageBroken(Error):
    code = 1203
    name = "ImageBroken"


class RecordDamaged(ImageBroken):
    """A record on disk (image, volume, journal) that cannot be read: truncated, empty, of
    the wrong types, an id that is not a bare UUID, not a regular file. ``data.file`` names it;
    a person must repair or remove it. Calls about other images never see it."""

    code = 1205
    name = "RecordDamaged"


class NoOperation(Error):
    code = 1204
    name = "NoOperation"


class NoSpace(Error):
    code = 1300
    name = "NoSpace"


class LeaseHeld(Error):
    """Another live host holds the lease of an image (data.hostId names it)."""

    code = 1301
    name = "LeaseHeld"


class ClaimLost(Error):
    """An owner's claim was taken back (its repository was disconnected by force; on shared
    storage, its lease expired): it must stop writing. Its operation stays resumable."""

    code = 1302
    name = "ClaimLost"


class StaleFix(Error):
    code = 1400
    name = "StaleFix"


class CommandFailed(Error):
    code = 1500
    name = "CommandFailed"


class OperationStopped(Error):
    """Raised inside a worker when a client stopped the operation; never sent to a client."""

    code = 1501
    name = "OperationStopped"


ALL: tuple[type[Error], ...] = (
    Error,
    InvalidArgument,
    RequestIdReused,
    RepositoryNotConnected,
    RepositoryAlreadyConnected,
    RepositoryNotFormatted,
    RepositoryLocked,
    RepositoryNotEmpty,
    UnsupportedFormat,
    RepositoryUnavailable,
    RepositoryUnsafe,
    ImageNotFound,
    ImageBusy,
    WrongImageKind,
    ImageBroken,
    RecordDamaged,
    NoOperation,
    NoSpace,
    LeaseHeld,
    LockspaceNotJoined,
    ClaimLost,
    StaleFix,
    CommandFailed,
    OperationStopped,
)
