"""What can go wrong in ``strata-client``; ``rpc.client.main`` turns each into an exit code and one
line on stderr (``transport.RemoteError``, the agent's own answer, is the fourth: exit 1)."""

from __future__ import annotations


class UsageError(Exception):
    """Bad arguments: exit 2."""


class Unreachable(Exception):
    """The agent cannot be reached or did not answer JSON-RPC: exit 3."""


class WatchFailed(Exception):
    """A watched operation failed: exit 4."""
