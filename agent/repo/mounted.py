"""The base of the shared formats: a repository in the layout of ``localfs-1.0`` on a file system
the agent mounts itself, and that other hosts mount too.

Connecting mounts the file system at ``<run_dir>/mnt/<format>-<hash of the parameters>``
(``[agent] run_dir``), checks what the format must check on the mounted file system, reads the
repository there, and joins its lockspace; disconnecting (and stopping the agent) leaves the
lockspace and unmounts, lazily when something still holds the mount. Formatting mounts the file
system on a scratch mount point of its own, lays the repository out, and unmounts again.

Everything the parameters say is checked before anything is mounted or written: the JSON schema
of each format (``PARAMETERS``, unknown keys refused), then the mount options it builds from
them (``mount_spec``), which refuse an option that would make records read stale on another host.

A second agent of this host is kept out by an fcntl lock next to the mount point (in run_dir,
on this host), taken before mounting. The repository's own ``ROOT/lock`` is not used: a lock on
the shared file system would keep every other host out, which is the point of sharing it.
Mounting and unmounting go through agent/command.py, like every child process.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import uuid
from typing import Any

from agent import command, errors
from agent.repo import contract, leases, localfs

log = logging.getLogger(__name__)

# sanlock's io_timeout, seconds: what formatStorageRepository records (options.ioTimeout).
IO_TIMEOUT = 10
IO_TIMEOUT_RANGE = (1, 60)

# mountOptions: what mount(8) -o takes, one string of comma-separated options.
MOUNT_OPTIONS: dict[str, Any] = {
    "type": "string", "maxLength": 1000, "pattern": "^[^,\\s][^\\s]*$",
    "description": "more mount options, comma-separated as for mount -o",
}
# A host name, an IPv4 address or a bracketed IPv6 one; never a leading "-" (an option to mount).
SERVER: dict[str, Any] = {
    "type": "string", "minLength": 1, "maxLength": 255,
    "pattern": "^([A-Za-z0-9][A-Za-z0-9.-]*|\\[[0-9A-Fa-f:.]+\\])$",
    "description": "the server's host name or address",
}


@dataclasses.dataclass(frozen=True)
class MountSpec:
    """What mount(8) gets: ``mount -t vfs_type -o options source <mount point>``."""

    vfs_type: str
    source: str
    options: tuple[str, ...]

    def argv(self, target: str) -> list[str]:
        opts = ["-o", ",".join(self.options)] if self.options else []
        return ["mount", "-t", self.vfs_type, *opts, self.source, target]


def split_options(params: dict[str, Any]) -> list[str]:
    """The admin's ``mountOptions``, one item per option."""
    text = params.get("mountOptions", "")
    items = [o.strip() for o in text.split(",")] if text else []
    if any(not o for o in items):
        raise errors.InvalidArgument(
            "connectionParameters.mountOptions: an empty option (two commas in a row, or a "
            "trailing comma)", param="connectionParameters.mountOptions")
    return items


def option_name(option: str) -> str:
    return option.split("=", 1)[0]


def refuse_option(option: str, why: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(
        f"connectionParameters.mountOptions: {option!r} is refused: {why}",
        param="connectionParameters.mountOptions", option=option_name(option))


def io_timeout_of(options: dict[str, Any]) -> int:
    value = options.get("ioTimeout")
    if value is None:
        return IO_TIMEOUT
    low, high = IO_TIMEOUT_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise errors.InvalidArgument(
            f"options.ioTimeout: {value!r} is not a whole number of seconds from {low} to "
            f"{high}", param="options.ioTimeout")
    return value


class MountedRepository(localfs.LocalRepository):
    """A repository on a file system this agent mounts; see the module's docstring."""

    shared = True
    # A read on a network file system can hang on a lost server: never on the event loop.
    INLINE_READS = False
    CAPABILITIES = (*localfs.LocalRepository.CAPABILITIES, contract.Capability.SHARED)

    def __init__(self, root: str, repo_uuid: str, io_timeout: int = IO_TIMEOUT) -> None:
        super().__init__(root, repo_uuid)
        # sanlock's io_timeout for this repository, as format recorded it: every host uses it.
        self.io_timeout = io_timeout
        self._mounted = False
        self._spec: MountSpec | None = None  # what open mounted: recover mounts it again

    # -- what each format says -----------------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def mount_spec(cls, params: dict[str, Any]) -> MountSpec:
        """The mount of checked parameters, with the options this format needs for safety;
        InvalidArgument naming the option when the admin's contradict them."""

    def _check_mounted(self, spec: MountSpec) -> None:
        """What must hold of the mounted file system before the agent uses it (a format
        whose safety depends on server settings checks them here)."""

    # -- the hooks of the lockspace and lease layer -----------------------------------------

    @classmethod
    def _format_areas(cls, root: str, repo_uuid: str, io_timeout: int) -> None:
        """Called by format once the directories exist and before repository.json is written
        (a repository is not one until then, so nothing can reference these areas before they
        are whole): the lockspace and the repository lease (agent/repo/leases.py)."""
        leases.format_areas(root, repo_uuid, io_timeout)

    def recover(self) -> None:
        """Mount again a file system that stopped answering for good (its FUSE client died, a
        server came back under a new session), at the same place: called before each attempt
        to join the lockspace again after a loss. Nothing is written meanwhile: this host is
        out of the lockspace."""
        spec = self._spec
        if self.closed or not self._mounted or spec is None:
            return
        try:
            os.statvfs(self.root)
            os.listdir(self.root)
            return  # it answers: the lockspace join says the rest
        except OSError as e:
            log.warning("event=mount_dead target=%s error=%r", self.root, e.strerror)
        with contextlib.suppress(errors.CommandFailed):
            command.run(["umount", "-l", self.root])
        _mount(spec, self.root)
        self._check_mounted(spec)
        log.info("event=mount_recovered format=%s target=%s", self.FORMAT, self.root)

    def _leave(self) -> None:
        """Called by close before the file system is unmounted: leave the lockspace (the
        leases go, then the host id). The host joins it once connected (Host.connect: the
        host id is the host's)."""
        if self.membership is not None:
            self.membership.stop()

    # -- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def _checked(cls, params: dict[str, Any]) -> MountSpec:
        cls.check_parameters(params)
        return cls.mount_spec(params)

    @classmethod
    def location(cls, params: dict[str, Any], run_dir: str) -> str:
        cls._checked(params)
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
        return os.path.join(run_dir, "mnt", f"{cls.FORMAT}-{digest[:12]}")

    @classmethod
    def format(cls, params: dict[str, Any], options: dict[str, Any], run_dir: str,
               connected: tuple[str, ...] = ()) -> str:
        spec = cls._checked(params)
        io_timeout = io_timeout_of(options)
        # A scratch mount point of its own: the repository may be connected here right now
        # (then its repository.json refuses the format), and two formats must not meet.
        target = os.path.join(run_dir, "mnt", f"format-{uuid.uuid4().hex[:12]}")
        os.makedirs(target)
        try:
            _mount(spec, target)
            try:
                probe = cls(target, "", io_timeout)
                probe._check_mounted(spec)
                repo_uuid = cls._format_root(target, {"ioTimeout": io_timeout})
            finally:
                _unmount(target)
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(target)
        log.info("event=formatted_shared format=%s source=%s io_timeout=%d", cls.FORMAT,
                 spec.source, io_timeout)
        return repo_uuid

    @classmethod
    def _before_meta(cls, root: str, meta: dict[str, Any]) -> None:
        cls._format_areas(root, meta["uuid"], meta["ioTimeout"])

    @classmethod
    def open(cls, params: dict[str, Any], run_dir: str) -> MountedRepository:
        spec = cls._checked(params)
        target = cls.location(params, run_dir)
        os.makedirs(target, exist_ok=True)
        # Before the mount: a second agent of this host must not mount over the first's.
        fd = localfs.lock(target + ".lock", target)
        repo = cls(target, "")
        repo._lock_fd = fd
        repo._spec = spec
        try:
            if is_mount_point(target):
                # An agent that died left it mounted (a VM may still use it): the name is the
                # hash of these very parameters and the lock is ours, so it is this mount.
                log.info("event=mount_reused format=%s target=%s", cls.FORMAT, target)
            else:
                _mount(spec, target)
            repo._mounted = True
            repo._check_mounted(spec)
            meta = cls._read_meta(target)
            repo.uuid = meta["uuid"]
            io_timeout = meta.get("ioTimeout")
            low, high = IO_TIMEOUT_RANGE
            if isinstance(io_timeout, bool) or not isinstance(io_timeout, int) \
                    or not low <= io_timeout <= high:
                raise errors.RepositoryNotFormatted(
                    f"{target} (from {spec.source}) is damaged: repository.json has no valid "
                    f"ioTimeout ({io_timeout!r})")
            repo.io_timeout = io_timeout
            repo._start()
        except BaseException:
            repo.close()
            raise
        log.info("event=mounted format=%s source=%s target=%s io_timeout=%d", cls.FORMAT,
                 spec.source, target, repo.io_timeout)
        return repo

    def close(self) -> None:
        """Leave the lockspace, let the repository go and unmount (lazily when something
        still holds the mount: a call stuck in a hung file system, a VM's open image)."""
        if self.closed and not self._mounted:
            return
        if self._mounted:
            with contextlib.suppress(Exception):  # logged by the hook; unmount regardless
                self._leave()
        fd, self._lock_fd = self._lock_fd, None
        super().close()
        if self._mounted:
            self._mounted = False
            _unmount(self.root)
        with contextlib.suppress(OSError):  # the empty mount point (never a mounted one)
            os.rmdir(self.root)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # last: another agent of this host may mount it from now on


def _mount(spec: MountSpec, target: str) -> None:
    try:
        command.run(spec.argv(target))
    except errors.CommandFailed as e:
        # Nothing is mounted: mount(8) failed as a whole.
        raise errors.RepositoryUnavailable(
            f"cannot mount {spec.source} ({spec.vfs_type}) at {target}: {e.message}",
            source=spec.source, target=target) from None


def is_mount_point(path: str) -> bool:
    """Whether something is mounted at ``path`` (os.path.ismount misses a bind of a directory
    of the same file system: the kernel's mount table does not)."""
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ")
            # Field 5 is the mount point, with space, tab, newline and backslash in octal.
            if len(fields) > 4 and _unescape(fields[4]) == path:
                return True
    return False


def _unescape(field: str) -> str:
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def _unmount(target: str) -> None:
    if not is_mount_point(target):
        return
    try:
        command.run(["umount", target])
    except errors.CommandFailed as e:
        # Busy (sanlock still leaving the lockspace, whose file it keeps open for a few
        # seconds; a call stuck in a hung file system; a VM still holding an image): detach
        # it now, the kernel lets go once the last user does. Nothing of the agent's writes
        # there any more: the repository is closed.
        log.info("event=unmount_lazy target=%s error=%r", target, e.message)
        try:
            command.run(["umount", "-l", target])
        except errors.CommandFailed as e2:
            log.error("event=unmount_failed target=%s error=%r", target, e2.message)
            return
    log.info("event=unmounted target=%s", target)
