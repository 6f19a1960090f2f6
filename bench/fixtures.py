"""Images that several figures use, made through the API (and their bare twins), made once."""

from __future__ import annotations

import dataclasses

from bench import agentproc, context, tools
from bench.tools import GiB, MiB

DEFAULT = agentproc.DEFAULT


@dataclasses.dataclass
class Chain:
    """A disk whose top snapshot has three layers: 1 GiB, 0.5 GiB and 0.5 GiB of data."""

    disk: str
    snapshots: list[str]  # oldest first; the last is the top snapshot
    top_path: str  # the top snapshot's volume: what a bare qemu-img reads
    size: int
    data: int  # bytes of data in the chain


class Images:
    def __init__(self, b: context.Bench) -> None:
        self.b = b
        self._empty_snapshots: dict[int, str] = {}
        self._bare_bases: dict[tuple[int, bool], str] = {}
        self._chain: Chain | None = None
        self._serial = 0

    @property
    def agent(self) -> agentproc.Agent:
        return self.b.agent

    def _name(self, stem: str) -> str:
        self._serial += 1
        return self.b.path("bare", f"{stem}-{self._serial}.qcow2")

    def empty_snapshot(self, size: int) -> str:
        """A snapshot of an empty disk of ``size`` bytes in the default repository."""
        if size not in self._empty_snapshots:
            disk = self.agent.settled(DEFAULT, "createVirtualDisk", targetRepoId=DEFAULT,
                                      size=size)
            self._empty_snapshots[size] = self.agent.settled(
                DEFAULT, "createSnapshot", targetRepoId=DEFAULT, baseVirtualDiskId=disk)
        return self._empty_snapshots[size]

    def empty_disk(self, size: int = GiB) -> str:
        return self.agent.settled(DEFAULT, "createVirtualDisk", targetRepoId=DEFAULT, size=size)

    def data_disk(self, size: int = GiB) -> str:
        """A new disk whose own (top) volume holds ``size`` bytes of data."""
        disk = self.empty_disk(size)
        self.agent.write(DEFAULT, disk, tools.span(0, size, 0x5A))
        return disk

    def bare_base(self, size: int, data: bool) -> str:
        """A bare qcow2 next to the repositories: empty, or full of data."""
        key = (size, data)
        if key not in self._bare_bases:
            path = self._name("base")
            tools.create(path, size)
            if data:
                tools.write(path, tools.span(0, size, 0x5A))
            self._bare_bases[key] = path
        return self._bare_bases[key]

    def bare_overlay(self, base: str, size: int) -> float:
        """One bare ``qemu-img create -b``: the reference for thin creates and snapshots."""
        return tools.create(self._name("overlay"), size, backing=base)

    def chain(self) -> Chain:
        if self._chain is None:
            self.b.say("making a 3-layer chain with 2 GiB of data")
            size = 2 * GiB
            disk = self.empty_disk(size)
            snaps = []
            for off, length, pattern in ((0, GiB, 0x11), (GiB, 512 * MiB, 0x22),
                                         (GiB + 512 * MiB, 512 * MiB, 0x33)):
                self.agent.write(DEFAULT, disk, tools.span(off, length, pattern))
                snaps.append(self.agent.settled(DEFAULT, "createSnapshot",
                                                targetRepoId=DEFAULT, baseVirtualDiskId=disk))
            info = self.agent.call("getImageInfo", DEFAULT, snaps[-1])
            if info["depth"] != 3:
                raise context.BenchError(f"the top snapshot has depth {info['depth']}, not 3")
            self._chain = Chain(disk, snaps, self.agent.top_path(DEFAULT, snaps[-1]), size,
                                2 * GiB)
        return self._chain
