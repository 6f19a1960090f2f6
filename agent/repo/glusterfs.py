"""``glusterfs-1.0``: a repository on a GlusterFS volume, FUSE-mounted by the agent with
``mount -t glusterfs <server>:/<volume>``.

With GlusterFS's defaults another host reads a record's *old* content for up to a second after a
rename-over (measured: DESIGN.md, "Shared repositories"). Two things make it coherent, and both
are required here:

- mount options ``attribute-timeout=0,entry-timeout=0,negative-timeout=0`` (the FUSE kernel
  module caches nothing), always added; the admin's ``mountOptions`` may add others, and a
  contrary value of one of these is refused, naming it;
- volume options ``performance.stat-prefetch off``, ``performance.quick-read off``,
  ``performance.open-behind off``, ``performance.strict-o-direct on`` (the client's translators
  cache nothing a record depends on). They are checked at connect and at format on the graph
  the mounted client really runs (``<mount>/.meta/graphs/active/volfile``: the translator of a
  performance option that is off is not in it), which needs neither the gluster CLI on this host
  nor access to glusterd's management port; a volume that fails is refused, naming the option
  and the command that fixes it, and unmounted again.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

from agent import errors
from agent.repo import mounted

COHERENT_MOUNT = {"attribute-timeout": "0", "entry-timeout": "0", "negative-timeout": "0"}


@dataclasses.dataclass(frozen=True)
class VolumeOption:
    name: str
    value: str
    xlator: str  # the client translator the option turns off, or whose option it sets
    xlator_option: str = ""  # the translator's own option that must say ``value``


VOLUME_OPTIONS = (
    VolumeOption("performance.stat-prefetch", "off", "performance/md-cache"),
    VolumeOption("performance.quick-read", "off", "performance/quick-read"),
    VolumeOption("performance.open-behind", "off", "performance/open-behind"),
    VolumeOption("performance.strict-o-direct", "on", "performance/write-behind",
                 "strict-o_direct"),
)


def parse_volfile(text: str) -> list[tuple[str, dict[str, str]]]:
    """The translators of a client volume file: (type, options) each."""
    out: list[tuple[str, dict[str, str]]] = []
    kind, options = "", dict[str, str]()
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "volume":
            kind, options = "", {}
        elif words[0] == "type" and len(words) > 1:
            kind = words[1]
        elif words[0] == "option" and len(words) > 1:
            options[words[1].lower()] = " ".join(words[2:]).lower()
        elif words[0] == "end-volume":
            out.append((kind, options))
    return out


def unsafe_options(volfile: str) -> list[VolumeOption]:
    """The volume options the client graph shows are not set as a shared repository needs."""
    xlators = parse_volfile(volfile)
    bad = []
    for opt in VOLUME_OPTIONS:
        found = [o for kind, o in xlators if kind == opt.xlator]
        if not opt.xlator_option:
            if found:  # the translator runs: the option that would remove it is on
                bad.append(opt)
        elif any(o.get(opt.xlator_option) != opt.value for o in found):
            bad.append(opt)
    return bad


class GlusterRepository(mounted.MountedRepository):
    FORMAT = "glusterfs-1.0"
    PARAMETERS: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["server", "volume"],
        "additionalProperties": False,
        "properties": {
            "server": mounted.SERVER,
            "volume": {"type": "string", "minLength": 1, "maxLength": 64,
                       "pattern": "^[A-Za-z0-9_][A-Za-z0-9_-]*$",
                       "description": "the GlusterFS volume's name"},
            "mountOptions": mounted.MOUNT_OPTIONS,
        },
    }

    @classmethod
    def mount_spec(cls, params: dict[str, Any]) -> mounted.MountSpec:
        extra = []
        for option in mounted.split_options(params):
            name, _, value = option.partition("=")
            if name in COHERENT_MOUNT:
                if value != COHERENT_MOUNT[name]:
                    raise mounted.refuse_option(
                        option, f"another host would read stale records; the repository is "
                        f"always mounted with {name}={COHERENT_MOUNT[name]}")
                continue
            extra.append(option)
        coherent = tuple(f"{k}={v}" for k, v in COHERENT_MOUNT.items())
        return mounted.MountSpec("glusterfs", f"{params['server']}:/{params['volume']}",
                                 (*coherent, *extra))

    def _check_mounted(self, spec: mounted.MountSpec) -> None:
        path = os.path.join(self.root, ".meta", "graphs", "active", "volfile")
        try:
            with open(path) as f:
                volfile = f.read()
        except OSError as e:
            raise errors.RepositoryUnavailable(
                f"cannot read the GlusterFS client graph of {spec.source} ({path}): "
                f"{e.strerror}; its volume options cannot be checked", source=spec.source
            ) from None
        bad = unsafe_options(volfile)
        if bad:
            volume = spec.source.split(":/", 1)[1]
            fixes = "; ".join(f"gluster volume set {volume} {o.name} {o.value}" for o in bad)
            raise errors.RepositoryUnsafe(
                f"GlusterFS volume {spec.source} has "
                + ", ".join(f"{o.name} not {o.value}" for o in bad)
                + f": another host could read stale records. Fix it on a server: {fixes}",
                source=spec.source, options=[o.name for o in bad])
