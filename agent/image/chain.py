"""Walking an image's chain of volumes, top first, and what can be wrong with it.

The walk works on any record source (the repository, or an inventory of all its records loaded
once), so getImageStatus on one image and the checker on 10,000 use the same rules.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from agent import errors, qcow2
from agent.image import journals, model
from agent.repo import contract, layout

# qemu refuses chains deeper than this anyway; a longer walk means a loop in the records.
MAX_DEPTH = 1000

GetVolume = Callable[[str], "model.Volume | None"]
GetImage = Callable[[str], "model.Image | None"]


def walk(
    top_id: str, get_volume: GetVolume, get_image: GetImage | None = None
) -> tuple[list[model.Volume], str | None]:
    """The chain as far as it can be followed, and the fault that stopped it (None when sound)."""
    out: list[model.Volume] = []
    seen: set[str] = set()
    vol_id: str | None = top_id
    while vol_id is not None:
        if vol_id in seen or len(out) > MAX_DEPTH:
            return out, f"the chain loops at volume {vol_id}"
        seen.add(vol_id)
        try:
            vol = get_volume(vol_id)
        except errors.RecordDamaged as e:
            return out, f"the record of volume {vol_id} of the chain is damaged: {e.message}"
        if vol is None:
            below = f" (below volume {out[-1].id})" if out else ""
            return out, f"volume {vol_id} of the chain has no record{below}: unknown parent"
        if get_image is not None and vol.parent_image_id is not None:
            try:
                parent = get_image(vol.parent_image_id)
            except errors.RecordDamaged as e:
                return out, f"the record of parent image {vol.parent_image_id} is damaged: " \
                    f"{e.message}"
            if parent is not None and parent.kind == model.Kind.DISK and not parent.removed:
                return out, (
                    f"volume {vol.id} is backed by a layer of disk {parent.id}; only "
                    "snapshots can be parents (a parent of the wrong kind)"
                )
        out.append(vol)
        vol_id = vol.parent_volume_id
    return out, None


class Lookup:
    """Volume records: this repository's first, then, when ``elsewhere`` is given, any other
    connected repository's (a chain may lean on a backing volume that lives elsewhere). It
    remembers which volumes came from elsewhere, and from where."""

    def __init__(self, local: GetVolume,
                 elsewhere: Callable[[str], tuple[contract.Repository, model.Volume] | None]
                 | None = None) -> None:
        self._local = local
        self._elsewhere = elsewhere
        self.foreign: dict[str, contract.Repository] = {}

    def __call__(self, vol_id: str) -> model.Volume | None:
        vol = self._local(vol_id)
        if vol is None and self._elsewhere is not None:
            found = self._elsewhere(vol_id)
            if found is not None:
                self.foreign[vol_id] = found[0]
                return found[1]
        return vol


def volumes(repo: contract.Repository, top_id: str) -> list[model.Volume]:
    vols, fault = walk(top_id, repo.get_volume)
    if fault is not None:
        raise errors.ImageBroken(fault)
    return vols


def image_ids(chain: list[model.Volume], top_image_id: str) -> list[str]:
    """The images along a chain: the top image, then each parent image, without repeats."""
    out = [top_image_id]
    for vol in chain:
        if vol.parent_image_id and vol.parent_image_id != out[-1]:
            out.append(vol.parent_image_id)
    return out


# (what is wrong, the backing reference to write when re-pointing the header is safe, else None)
FileFault = tuple[str, "str | None"]
# file_fault's shape: (the volume's repository, the volume, its parent, the parent's repository).
FileCheck = Callable[["contract.Repository", model.Volume, "model.Volume | None",
                      "contract.Repository | None"], "FileFault | None"]


def file_fault(repo: contract.Repository, vol: model.Volume, parent: model.Volume | None,
               parent_repo: contract.Repository | None = None) -> FileFault | None:
    """Compare a volume's data file with its record: a regular file of its repository (never
    followed), of the recorded format, without an external data file, whose backing reference
    names exactly the volume the records say (``parent``, in ``parent_repo`` when that is
    another repository), with its format. None when it is sound."""
    path = repo.volume_path(vol.id, vol.format)
    problem = layout.file_problem(path)
    if problem is not None:
        return f"the data file of volume {vol.id} ({path}) {problem}", None
    finding = repo.findings.get(vol.id)
    if finding is not None:
        return finding, None
    if vol.format == model.VolumeFormat.RAW:
        if vol.parent_volume_id is not None:
            return f"raw volume {vol.id} is recorded with a backing volume; a person must " \
                "decide which record is right", None
        return None  # raw content is guest data: never probed
    try:
        header = qcow2.read_header_cached(path)
    except OSError as e:
        return f"the data file of volume {vol.id} ({path}) cannot be read: {e.strerror}", None
    if header is None:
        return (f"volume {vol.id} is recorded as qcow2 but its file is not qcow2; a person "
                "must decide which is right"), None
    if header.incompatible_features & qcow2.EXTERNAL_DATA_FILE:
        return f"volume {vol.id} keeps its data in an external file, which Strata never " \
            "makes; a person must decide", None
    expected = fmt = None
    if parent is not None:
        fmt = parent.format.value
        expected = (repo.backing_reference(parent.id, parent.format)
                    if parent_repo is None or parent_repo is repo
                    else parent_repo.volume_path(parent.id, parent.format))
    if header.backing == expected:
        if expected is None or header.backing_format == fmt:
            return None
        if header.backing_format is None:  # qemu would probe the backing file's format
            return (f"volume {vol.id} does not say its backing file's format "
                    f"({fmt})"), expected
        return (f"volume {vol.id} says its backing file is {header.backing_format}, but the "
                f"records say {fmt}; a person must decide which is right"), None
    if (expected is not None and header.backing is not None
            and os.path.basename(header.backing) == os.path.basename(expected)):
        # Same volume, named another way (an absolute path from another mount): re-pointing
        # the header at it is safe; until then the image is not handed out.
        return (f"volume {vol.id} names its backing file {header.backing!r} instead of "
                f"{expected!r}"), expected
    return (f"volume {vol.id}'s backing file is {header.backing!r} but the records say "
            f"{expected!r}; a person must decide which chain is right"), None


def files_fault(repo: contract.Repository, vols: list[model.Volume],
                foreign: dict[str, contract.Repository] | None = None,
                skip: set[str] | frozenset[str] = frozenset(),
                cache: dict[str, FileFault | None] | None = None,
                check: FileCheck | None = None) -> str | None:
    """What is wrong with the first volume of a walked chain (top first) whose file does not
    match its record, None when all do. ``skip``: volumes an unfinished fix rewrites in place
    (their header names the new backing before the record does); ``cache``: results by volume
    id, for a listing whose images share layers; ``check``: file_fault, or what stands in for
    it (an inventory's, which skips files found sound lately)."""
    check = check or file_fault
    foreign = foreign or {}
    for i, vol in enumerate(vols):
        if vol.id in skip:
            continue
        if cache is not None and vol.id in cache:
            fault = cache[vol.id]
        else:
            parent = vols[i + 1] if i + 1 < len(vols) else None
            fault = check(foreign.get(vol.id, repo), vol, parent,
                          foreign.get(parent.id, repo) if parent is not None else None)
            if cache is not None:
                cache[vol.id] = fault
        if fault is not None:
            return fault_message(fault)
    return None


def fault_message(fault: FileFault) -> str:
    message, relink = fault
    return message + ("; the mend fix re-points it" if relink is not None else "")


def rewritten(repo: contract.Repository) -> set[str]:
    """Volumes an unfinished fix of ``repo`` rewrites in place (the fixes' journals alone,
    where the repository keeps an index of them)."""
    return journals.rewritten(repo)


def check_files(repo: contract.Repository, image_id: str, vols: list[model.Volume],
                foreign: dict[str, contract.Repository] | None = None,
                skip: set[str] | frozenset[str] = frozenset()) -> None:
    """Refuse (ImageBroken) a chain whose files do not match its records: nothing is handed
    to a consumer or to qemu-img otherwise."""
    fault = files_fault(repo, vols, foreign, skip)
    if fault is not None:
        raise errors.ImageBroken(f"image {image_id} cannot be used: {fault}", imageId=image_id)
