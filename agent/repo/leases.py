"""sanlock leases of a shared repository: its lockspace, and one lease per image.

On-disk areas (each ``sanlock.ALIGN_SIZE[0]`` bytes, fully allocated, written exactly once)::

    ROOT/leases/ids                   the lockspace: one delta lease per host id (1..2000)
    ROOT/leases/repository.lease      the repository lease: whole-repository work (clean)
    ROOT/leases/<imageId>.lease       an image's lease, written before anything acquires it;
                                      deleted by clean once its image is gone (reclaim)

An area is written to a temporary file and then *linked* to its name: ``link`` fails when the
name exists, so an area another host may hold is never initialized again (DESIGN.md: a
``write_resource`` over a held lease lets a second host take it).

The lockspace is named after the repository's uuid and each lease after its image id (both
36 bytes, under sanlock's 48). Leases belong to the registered process; a registration is used
by one thread at a time (two threads on one wedged the whole daemon), so this module keeps a
small pool of registrations per repository, each behind its own lock. One sanlock lease per
image and host: local owners that share it are counted (the in-process claim table decides
between them).

Never block on a lease a dead host holds: sanlock's acquire of a lease whose owner is failing
waits inside the daemon for over a minute. The owners are read first (``read_resource_owners``
and ``get_hosts``, about a millisecond), and only a free lease, or one whose owners are all
dead, is acquired.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import fcntl
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from agent import errors, fileio
from agent.image import model

try:
    import sanlock
except ImportError:  # pragma: no cover - python3-sanlock is a dependency of the package
    sanlock = None

log = logging.getLogger(__name__)

LEASES = "leases"
LOCKSPACE_FILE = "ids"
REPOSITORY_LEASE = "repository"
AREA = 1 << 20  # sanlock's smallest alignment: 2000 hosts of 512-byte sectors
MAX_HOSTS = 2000
IO_TIMEOUT = 10  # seconds, unless formatStorageRepository's options.ioTimeout says otherwise
REGISTRATIONS = 4

# sanlock's answers to an acquire (negative: sanlock's own codes).
HELD_ELSEWHERE = (-243, -244, -245)  # a live host holds it (or won the race for it)
HELD_HERE = errno.EEXIST  # this host holds it already (another registration of ours)
NOT_JOINED = errno.ENOSPC  # the lockspace is not joined
VERSION_MOVED = -240
# sanlock's answers when a read or write of the lease area failed or timed out (its aio
# timeout, dblock and leader I/O): the storage was slow or failed for a moment. Tried again a
# few times before the storage is called unavailable.
IO_FAILED = (-202, -210, -211, -220, -221)
IO_TRIES = 3

HOST_STATES = {1: "unknown", 2: "free", 3: "live", 4: "failing", 5: "dead"}


# The lockspaces (name, host id) this process left and sanlock may still be giving back.
_leaving: set[tuple[bytes, int]] = set()
_leaving_lock = threading.Lock()


class Mode(enum.Enum):
    SHARED = "shared"
    EXCLUSIVE = "exclusive"


def lockspace_name(repo_uuid: str) -> bytes:
    return repo_uuid.encode()


def area_path(root: str, name: str) -> str:
    return os.path.join(root, LEASES, LOCKSPACE_FILE if name == LOCKSPACE_FILE
                        else f"{name}.lease")


# -- areas -----------------------------------------------------------------------------------


def format_areas(root: str, repo_uuid: str, io_timeout: int) -> None:
    """The lockspace and the repository lease of a repository being formatted (before its
    repository.json is written: a repository never exists without them)."""
    _require_sanlock()
    os.makedirs(os.path.join(root, LEASES), 0o750, exist_ok=True)
    name = lockspace_name(repo_uuid)
    _write_once(area_path(root, LOCKSPACE_FILE), lambda path: sanlock.write_lockspace(
        name, path, max_hosts=MAX_HOSTS, iotimeout=io_timeout))
    write_lease(root, repo_uuid, REPOSITORY_LEASE)


def write_lease(root: str, repo_uuid: str, resource: str) -> bool:
    """Make ``resource``'s lease area unless it exists; True when this call made it."""
    _require_sanlock()
    name = lockspace_name(repo_uuid)
    return _write_once(area_path(root, resource), lambda path: sanlock.write_resource(
        name, resource.encode(), [(path, 0)], max_hosts=MAX_HOSTS))


def _write_once(path: str, init: Callable[[str], None]) -> bool:
    if os.path.lexists(path):
        return False
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        # Fully allocated: a lease whose blocks the file system could not find later (ENOSPC
        # on a renewal) would be lost when it matters.
        os.posix_fallocate(fd, 0, AREA)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        init(tmp)
        _fsync(tmp)
        try:
            os.link(tmp, path)  # never over an existing area: someone may hold it
        except FileExistsError:
            return False
        _fsync(os.path.dirname(path))
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _require_sanlock() -> None:
    if sanlock is None:
        raise errors.Error("python3-sanlock is not installed: shared repositories need it")


def _errno(e: Exception) -> int:
    return e.errno if isinstance(e.errno, int) else 0  # type: ignore[attr-defined]


# -- registrations ---------------------------------------------------------------------------


class _Registration:
    """One connection to the sanlock daemon, owning the leases acquired through it; used by one
    thread at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fd = sanlock.register()
        # A child that inherited it would keep its leases alive after the agent died.
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFD)
        fcntl.fcntl(self.fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        self.count = 0  # leases held through it

    def close(self) -> None:
        """Drop the connection: the daemon frees every lease held through it (in memory at once,
        on storage when it answers), without this process touching the storage."""
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclasses.dataclass
class _Lease:
    reg: _Registration
    mode: Mode
    version: int
    refs: int = 1


@dataclasses.dataclass(frozen=True)
class Owner:
    host_id: int
    state: str  # live, failing, dead, free, unknown

    @property
    def alive(self) -> bool:
        return self.state in ("live", "failing", "unknown")

    def to_dict(self) -> dict[str, Any]:
        return {"hostId": self.host_id, "state": self.state, "alive": self.alive}


class Lockspace:
    """This host in one shared repository's lockspace: joining it, holding leases in it."""

    def __init__(self, root: str, repo_uuid: str, host_id: int, io_timeout: int) -> None:
        _require_sanlock()
        self.root = root
        self.repo_uuid = repo_uuid
        self.name = lockspace_name(repo_uuid)
        self.host_id = host_id
        self.io_timeout = io_timeout
        self.ids = area_path(root, LOCKSPACE_FILE)
        self._lock = threading.Lock()  # guards the fields below, never held over sanlock calls
        self._leases: dict[str, _Lease] = {}
        self._regs: list[_Registration] = []
        self._next = 0
        # resource -> the lock of whoever is acquiring it now: two local owners that may share
        # a lease (two readers) must not both ask sanlock for it (the second would be refused).
        self._taking: dict[str, threading.Lock] = {}
        self.generation = 0  # bumped at every loss: a lease of an older one is gone
        # Whether this host's renewals are on time (lockspace.Membership says): a lease is
        # only as good as the lockspace it lives in.
        self.fresh: Callable[[], bool] = lambda: True

    # -- joining -------------------------------------------------------------------------------

    def join(self) -> bool:
        """Acquire this host's id in the lockspace: blocks ``2·io_timeout + 1`` s or so. False
        when sanlock says this host has it already, or is still giving it back."""
        self._wait_left()
        try:
            sanlock.add_lockspace(self.name, self.host_id, self.ids, iotimeout=self.io_timeout)
        except sanlock.SanlockException as e:
            # EEXIST: joined already (a reconnect), or still being left (see Membership).
            # EAGAIN: being left right now.
            if _errno(e) not in (errno.EEXIST, errno.EAGAIN):
                raise
            return False
        return True

    def _wait_left(self) -> None:
        """If this process left the lockspace (a disconnect, which does not wait for sanlock
        to give the host id back), wait until the daemon no longer has it: for a moment after
        ``rem_lockspace(wait=False)`` it still lists it as joined, and an add then says it
        exists, so a connect right after would take a lockspace on its way out for joined."""
        key = (self.name, self.host_id)
        with _leaving_lock:
            if key not in _leaving:
                return
        deadline = time.monotonic() + 4 * self.io_timeout + 10
        while self.daemon_flags() is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        with _leaving_lock:
            _leaving.discard(key)

    def daemon_flags(self) -> int | None:
        """This lockspace's flags in the daemon (0: joined; LSFLAG_ADD or LSFLAG_REM: being
        joined or left), None when the daemon does not have it at all."""
        for ls in sanlock.get_lockspaces():
            if ls["lockspace"] == self.name and int(ls["host_id"]) == self.host_id:
                return int(ls["flags"])
        return None

    def joined(self) -> bool:
        try:
            return bool(sanlock.inq_lockspace(self.name, self.host_id, self.ids))
        except sanlock.SanlockException:
            return False

    def present(self) -> bool:
        """Whether the daemon still has this lockspace (joined, or on its way out)."""
        try:
            return any(ls["lockspace"] == self.name for ls in sanlock.get_lockspaces())
        except sanlock.SanlockException:
            return False

    def remove(self) -> None:
        """Give the host id back, without waiting the io_timeouts sanlock takes for it (the
        storage may be what failed). ``unused``: never let sanlock "terminate the processes
        holding leases" in it, which would be this agent."""
        sanlock.rem_lockspace(self.name, self.host_id, self.ids, wait=False, unused=True)

    def leave(self) -> None:
        """Release everything and give the host id back (a disconnect)."""
        self.drop()
        with contextlib.suppress(sanlock.SanlockException):
            # Not waited for (sanlock takes 2-3·io_timeout to let the host id go): the daemon
            # keeps the lockspace file open until then, so the unmount that follows is lazy.
            # The next join here waits for it instead (_wait_left).
            with _leaving_lock:
                _leaving.add((self.name, self.host_id))
            self.remove()

    def drop(self) -> None:
        """Let every lease go at once, without touching the storage (which may be what failed):
        the registrations are closed and the daemon frees what they held."""
        with self._lock:
            regs, self._regs = self._regs, []
            self._leases.clear()
            self.generation += 1
        for reg in regs:
            reg.close()

    # -- leases --------------------------------------------------------------------------------

    def owners(self, resource: str) -> list[Owner]:
        """Who holds ``resource`` now, as the lease on storage and the lockspace say."""
        path = area_path(self.root, resource)
        if not os.path.exists(path):
            return []
        try:
            found = sanlock.read_resource_owners(self.name, resource.encode(), [(path, 0)])
        except sanlock.SanlockException as e:
            raise errors.RepositoryUnavailable(
                f"cannot read the lease of {resource}: {e}", path=path) from None
        out = []
        for o in found:
            hid = int(o["host_id"])
            if hid == self.host_id:
                out.append(Owner(hid, "live"))
                continue
            out.append(Owner(hid, self._host_state(hid, int(o.get("generation", 0)))))
        return out

    def _host_state(self, host_id: int, generation: int) -> str:
        try:
            hosts = sanlock.get_hosts(self.name, host_id)
        except sanlock.SanlockException:
            return "unknown"
        if not hosts:
            return "unknown"
        h = hosts[0]
        if generation and int(h.get("generation", 0)) > generation:
            return "dead"  # it joined again since: what it held before died with it
        return HOST_STATES.get(int(h.get("flags", 1)) & 0x7, "unknown")

    def acquire(self, wanted: dict[str, Mode], what: str) -> Held:
        """Take every lease of ``wanted`` (resource -> mode), all or none: ``LeaseHeld`` naming
        the host when another live host holds one."""
        held = Held(self, what)
        try:
            for resource, mode in sorted(wanted.items()):
                self._take(resource, mode, what)
                held.resources[resource] = mode
        except BaseException:
            held.release()
            raise
        held.generation = self.generation
        return held

    def acquire_for_record(self, resource: str, what: str) -> Held:
        """The lease under which a call that takes no claim (setImageUserData) changes an
        image's record: the record of one image is written by one host at a time. Taken
        exclusively, unless this host holds it already (its own operation, or its consumer):
        then this host's writers are serialized by its metadata lock, and in shared mode only
        another host that shares it (a VM moving over, a copy reading it) refuses the call."""
        with self._lock:
            lease = self._leases.get(resource)
            mode = Mode.EXCLUSIVE if lease is None else lease.mode
        if mode == Mode.SHARED:
            self._refuse_if_held(resource, what)
        return self.acquire({resource: mode}, what)

    def _take(self, resource: str, mode: Mode, what: str) -> None:
        with self._lock:
            taking = self._taking.setdefault(resource, threading.Lock())
        with taking:
            self._take_locked(resource, mode, what)

    def _take_locked(self, resource: str, mode: Mode, what: str) -> None:
        with self._lock:
            lease = self._leases.get(resource)
            if lease is not None:
                if lease.mode == Mode.SHARED and mode == Mode.EXCLUSIVE:
                    raise errors.ImageBusy(
                        f"{resource} is held for reading on this host; {what} needs it for "
                        "writing", imageId=resource)
                lease.refs += 1
                return
        write_lease(self.root, self.repo_uuid, resource)
        self._refuse_if_held(resource, what)
        reg = self._registration()
        path = area_path(self.root, resource)
        with reg.lock:
            io_tries = freed_tries = 0
            while True:
                try:
                    sanlock.acquire(self.name, resource.encode(), [(path, 0)], slkfd=reg.fd,
                                    shared=mode == Mode.SHARED)
                    break
                except sanlock.SanlockException as e:
                    code = _errno(e)
                    if code in IO_FAILED and io_tries + 1 < IO_TRIES:
                        io_tries += 1
                        log.warning("event=lease_io_retry lockspace=%s resource=%s error=%r",
                                    self.repo_uuid, resource, str(e))
                        time.sleep(0.2 * io_tries)
                        continue
                    if code in HELD_ELSEWHERE:
                        others = [o for o in self.owners(resource) if o.host_id != self.host_id]
                        if others:
                            raise self._held(resource, others[0], what) from None
                        if freed_tries + 1 < IO_TRIES:
                            # Its holder let it go between the refusal and the look: as if
                            # this call had come a moment later, so it tries again.
                            freed_tries += 1
                            log.info("event=lease_freed_retry lockspace=%s resource=%s",
                                     self.repo_uuid, resource)
                            continue
                    self._acquire_failed(resource, e, what)
            version = 0
            with contextlib.suppress(sanlock.SanlockException):
                for r in sanlock.inquire(slkfd=reg.fd):
                    if r["resource"] == resource.encode():
                        version = int(r["version"])
        with self._lock:
            reg.count += 1
            self._leases[resource] = _Lease(reg, mode, version)

    def _refuse_if_held(self, resource: str, what: str) -> None:
        for owner in self.owners(resource):
            if owner.host_id != self.host_id and owner.state not in ("dead", "free"):
                raise self._held(resource, owner, what)

    def _held(self, resource: str, owner: Owner, what: str) -> errors.LeaseHeld:
        how = {"live": "", "failing": " (its storage is failing; if it died, its lease is free "
               f"{8 * self.io_timeout + 60} s after its last renewal)",
               "unknown": " (not yet known whether it lives: this host joined only now)"}
        return errors.LeaseHeld(
            f"{resource} is held by host {owner.host_id}{how.get(owner.state, '')}; {what} "
            "cannot take it", imageId=resource, hostId=owner.host_id, hostState=owner.state)

    def _acquire_failed(self, resource: str, e: Exception, what: str) -> None:
        code = _errno(e)
        if code in HELD_ELSEWHERE:
            # Taken and let go again by others faster than this host could look, each time.
            raise errors.LeaseHeld(
                f"{resource} is in use by other hosts, each holding it only briefly; {what} "
                "could not take it", imageId=resource, hostId=None, hostState="unknown") \
                from None
        if code == NOT_JOINED:
            raise errors.LockspaceNotJoined(
                f"this host is not in the lockspace of repository {self.repo_uuid}",
                lockspace=self.repo_uuid) from None
        if code == HELD_HERE:
            raise errors.ImageBusy(f"{resource} is held by another owner on this host",
                                   imageId=resource) from None
        raise errors.RepositoryUnavailable(
            f"sanlock cannot acquire the lease of {resource}: {e}",
            path=area_path(self.root, resource)) from None

    def _registration(self) -> _Registration:
        with self._lock:
            if len(self._regs) < REGISTRATIONS:
                reg = _Registration()
                self._regs.append(reg)
                return reg
            self._next = (self._next + 1) % len(self._regs)
            return self._regs[self._next]

    def release(self, resource: str) -> None:
        with self._lock:
            taking = self._taking.setdefault(resource, threading.Lock())
        with taking:  # an acquire of the same lease waits for the release to be done
            with self._lock:
                lease = self._leases.get(resource)
                if lease is None:
                    return
                lease.refs -= 1
                if lease.refs > 0:
                    return
                del self._leases[resource]
                lease.reg.count -= 1
            path = area_path(self.root, resource)
            with lease.reg.lock:
                try:
                    sanlock.release(self.name, resource.encode(), [(path, 0)],
                                    slkfd=lease.reg.fd)
                except sanlock.SanlockException as e:
                    # Gone already (the lockspace lost, the registration closed): not held.
                    log.info("event=lease_release_failed lockspace=%s resource=%s error=%r",
                             self.repo_uuid, resource, str(e))

    # -- the areas of images that are gone ----------------------------------------------------

    def image_areas(self) -> dict[str, str]:
        """The lease areas of images (image id -> path): regular files named after an id, so
        nothing planted there (a symbolic link, another name) is ever handed to sanlock."""
        directory = os.path.join(self.root, LEASES)
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return {}
        out = {}
        for entry in entries:
            stem, dot, ext = entry.name.partition(".")
            if dot and ext == "lease" and model.is_id(stem) and \
                    entry.is_file(follow_symlinks=False):
                out[stem] = entry.path
        return out

    def in_use(self, resource: str) -> bool:
        """Whether any host (this one included) holds ``resource`` now."""
        with self._lock:
            if resource in self._leases:
                return True
        return bool(self.owners(resource))

    def reclaim(self, resource: str, what: str) -> bool:
        """Delete the lease area of an image that is gone (clean): taken exclusively first, so
        that nobody holds it and nobody takes it while it goes, then unlinked and let go. The
        next host that needs a lease of that name writes a new area. False when it is held,
        here or elsewhere."""
        with self._lock:
            if resource in self._leases:
                return False  # held by this host (acquire would only count it again)
        try:
            held = self.acquire({resource: Mode.EXCLUSIVE}, what)
        except (errors.LeaseHeld, errors.ImageBusy):
            return False
        try:
            fileio.remove(area_path(self.root, resource))
        finally:
            held.release()
        return True

    def holds(self, resource: str, generation: int) -> bool:
        """Whether this host still holds ``resource`` as acquired in ``generation``: asked of
        the daemon (no storage I/O), and refused when this host's renewals are late."""
        with self._lock:
            lease = self._leases.get(resource)
            if lease is None or generation != self.generation:
                return False
        with lease.reg.lock:
            try:
                held = sanlock.inquire(slkfd=lease.reg.fd)
            except sanlock.SanlockException:
                return False
        if not any(r["resource"] == resource.encode() and int(r["version"]) == lease.version
                   for r in held):
            return False
        return self.fresh()

    def version(self, resource: str) -> int | None:
        with self._lock:
            lease = self._leases.get(resource)
            return None if lease is None else lease.version

    @property
    def loss_age(self) -> float:
        """How late a renewal may be before this host stops writing. sanlock renews every
        2·io_timeout, a renewal's write may take io_timeout or more on a loaded file system
        (3 s seen here on GlusterFS at io_timeout 1, and its timestamp is its start), and it
        gives the lockspace up at 8·io_timeout: this leaves 2·io_timeout to stop qemu-img and
        let the leases go before sanlock would kill the agent."""
        return 6.0 * self.io_timeout


class Held:
    """The leases one owner holds."""

    def __init__(self, space: Lockspace, what: str) -> None:
        self.space = space
        self.what = what
        self.resources: dict[str, Mode] = {}
        self.generation = space.generation
        self.released = False

    def valid(self) -> bool:
        return not self.released and all(
            self.space.holds(r, self.generation) for r in self.resources)

    def versions(self) -> dict[str, int]:
        return {r: v for r in self.resources if (v := self.space.version(r)) is not None}

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        for r in self.resources:
            self.space.release(r)
