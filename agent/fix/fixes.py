"""A fix as the checker proposes it, and the digest that makes its opaque data checkable."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections.abc import Callable
from typing import Any

from agent.image import claims


class FixType(enum.StrEnum):
    CLEAN = "clean"
    OPTIMIZE = "optimize"
    MERGE = "merge"
    MEND = "mend"
    # Not a fix: an operation another live host runs on a shared repository, shown by the
    # check where a mend would be if that host were dead. Never run.
    RUNNING = "running"


@dataclasses.dataclass
class Fix:
    type: FixType
    image_ids: list[str]
    description: str
    # The facts this fix was derived from; its digest is the opaque ``data`` clients see.
    facts: dict[str, Any]
    # What running it does, under the claim of its images; bound to the state the checker saw,
    # never to client input.
    run: Callable[[claims.Claim], object] = dataclasses.field(
        repr=False, compare=False, default=lambda _claim: None
    )
    # A finding only a person can resolve (which of two chains is right...): listed, never run.
    manual: bool = False
    # Fields for people and tools, outside the fix's identity (runningOn).
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def data(self) -> str:
        canonical = json.dumps({"type": self.type.value, **self.facts}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def matches(self, sent: dict[str, Any]) -> bool:
        """Whether a client sent back exactly this fix: every field the checker gave."""
        return (sent.get("type") == self.type.value and sent.get("imageIds") == self.image_ids
                and sent.get("description") == self.description
                and sent.get("data") == self.data)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.type.value,
            "imageIds": self.image_ids,
            "description": self.description,
            "data": self.data,
        }
        if self.manual:
            out["manual"] = True
        out.update(self.extra)
        return out
