"""``nfs-1.0``: a repository on an NFS export, mounted by the agent with the options a repository
shared by several hosts needs (nfs(5)):

- ``hard``: a soft mount gives up on a slow server and returns EIO to a write the server may
  still carry out: nfs(5) warns it can corrupt data silently. ``soft`` and ``softreval`` are
  refused.
- ``lookupcache=none``: with the default (``all``) a client trusts a cached directory entry,
  and a negative one ("no such file") for up to a minute, so a record another host just made
  reads as missing. ``positive`` is accepted too (nfs(5): it drops the negative entries, and
  the attributes below revalidate the positive ones); ``all`` is refused.
- ``actimeo=0``: no attribute caching, so a record replaced by a rename on another host is seen
  at the next open rather than up to a minute later. ``noac`` (stronger: synchronous writes
  too, slow for volume data) is accepted; a non-zero ``actimeo``/``acregmin``/``acregmax``/
  ``acdirmin``/``acdirmax``, or ``ac``, is refused.
- ``vers=<version>``: from the ``version`` parameter; a ``vers``/``nfsvers`` option that says
  otherwise is refused.

``nolock`` is accepted: it only stops NFS locks (NLM) reaching other clients, and the agent never
uses locks on shared storage to exclude other hosts (its own lock, against a second agent on
this host, lives in run_dir; hosts exclude each other with sanlock leases, which are reads and
writes of the lease areas).
"""

from __future__ import annotations

from typing import Any, ClassVar

from agent.repo import mounted

VERSIONS = ["3", "4", "4.0", "4.1", "4.2"]
SAFE = ("hard", "lookupcache=none", "actimeo=0")
ATTRIBUTE_CACHE = ("actimeo", "acregmin", "acregmax", "acdirmin", "acdirmax")


class NfsRepository(mounted.MountedRepository):
    FORMAT = "nfs-1.0"
    PARAMETERS: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["server", "export", "version"],
        "additionalProperties": False,
        "properties": {
            "server": mounted.SERVER,
            "export": {"type": "string", "pattern": "^/", "maxLength": 4000,
                       "description": "the exported directory, an absolute path"},
            "version": {"enum": VERSIONS, "description": "the NFS version (mount's vers=)"},
            "mountOptions": mounted.MOUNT_OPTIONS,
        },
    }

    @classmethod
    def mount_spec(cls, params: dict[str, Any]) -> mounted.MountSpec:
        version = params["version"]
        safe = [*SAFE, f"vers={version}"]
        extra = []
        for option in mounted.split_options(params):
            name, _, value = option.partition("=")
            if name in ("soft", "softreval"):
                raise mounted.refuse_option(
                    option, "a soft mount returns errors for writes the server may still "
                    "carry out, which nfs(5) warns can corrupt data; the repository is always "
                    "mounted hard")
            if name == "lookupcache":
                if value not in ("none", "positive"):
                    raise mounted.refuse_option(
                        option, "another host's new records would read as missing for up to "
                        "a minute; lookupcache=none (the default here) or positive")
                safe.remove("lookupcache=none")
            elif name in ATTRIBUTE_CACHE and value not in ("0",) or name == "ac":
                raise mounted.refuse_option(
                    option, "cached attributes hide records another host replaced; "
                    "attribute caching stays off (actimeo=0, or noac)")
            elif name in ATTRIBUTE_CACHE or name in ("hard", "noac"):
                continue  # what is added anyway, or stronger: noac implies actimeo=0
            elif name in ("vers", "nfsvers"):
                if value != version:
                    raise mounted.refuse_option(
                        option, f"the version parameter says {version}")
                continue
            extra.append(option)
        if "noac" in mounted.split_options(params):
            safe.remove("actimeo=0")
            safe.append("noac")
        source = f"{params['server']}:{params['export']}"
        return mounted.MountSpec("nfs", source, (*safe, *extra))
