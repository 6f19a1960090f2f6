"""Repository formats. ``FORMATS`` maps a repoFormat name to its driver class; the engine finds
drivers here and knows them only through ``agent.repo.contract``."""

from __future__ import annotations

from agent.repo import contract, glusterfs, localfs, nfs, posixfs

FORMATS: dict[str, type[contract.Repository]] = {
    driver.FORMAT: driver
    for driver in (localfs.LocalRepository, glusterfs.GlusterRepository,
                   posixfs.PosixRepository, nfs.NfsRepository)
}
