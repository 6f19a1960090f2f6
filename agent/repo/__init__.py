"""Repository formats. ``FORMATS`` maps a repoFormat name to its driver class."""

from __future__ import annotations

from agent.repo import localfs

FORMATS: dict[str, type[localfs.LocalRepository]] = {
    localfs.LocalRepository.FORMAT: localfs.LocalRepository,
}
