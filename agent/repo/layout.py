"""The on-disk layout every repository format shares (``localfs-1.0``'s, inside a mount for
the shared formats), and what the engine may know of it::

    ROOT/repository.json          format, uuid, version (and ioTimeout for a shared format)
    ROOT/images/<imageId>.json    image records
    ROOT/volumes/<volId>.<fmt>    volume data; qcow2 backing files are bare names in this directory
    ROOT/volumes/<volId>.json     volume records
    ROOT/journal/<opId>.json      operations not yet finished

The engine names the record kinds (a ``Damage`` says which kind its file was) and the suffix of
a volume's data file while it is produced; everything else about paths stays in the driver.
"""

from __future__ import annotations

import dataclasses
import os
import stat

from agent import errors

IMAGES = "images"
VOLUMES = "volumes"
JOURNAL = "journal"
# The directories a repository holds, in the order format makes them.
AREAS = (IMAGES, VOLUMES, JOURNAL)
# The file whose presence makes a directory a repository: written last by format.
META = "repository.json"
# A volume's data file while it is produced, before its rename to the final name.
PARTIAL = ".partial"


@dataclasses.dataclass(frozen=True)
class Damage:
    """A record file that cannot be read, and why."""

    path: str
    reason: str
    kind: str  # IMAGES, VOLUMES or JOURNAL
    rec_id: str | None  # the id its file name gives, when that is a bare UUID

    @property
    def message(self) -> str:
        return f"record {self.path} cannot be read: {self.reason}"

    def to_dict(self) -> dict[str, str]:
        return {"file": self.path, "error": self.reason}

    def error(self) -> errors.RecordDamaged:
        return errors.RecordDamaged(
            f"{self.message}; a person must repair or remove it", file=self.path)


def file_problem(path: str) -> str | None:
    """Why ``path`` cannot be a volume's data file (None: a regular file, not followed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "is missing"
    if stat.S_ISREG(st.st_mode):
        return None
    what = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else "a directory"
            if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
            else "not a regular file")
    return f"is {what}, not a regular file (never followed)"
