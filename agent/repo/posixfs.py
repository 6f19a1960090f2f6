"""``posixfs-1.0``: a repository on any shared POSIX file system the admin names (CephFS, a
clustered file system, or a bind of a directory that is already shared), mounted by the agent
with ``mount -t <vfsType> [-o <mountOptions>] <spec>``.

The agent cannot know what this file system caches, so it adds no options: the admin vouches
that every host reads what another wrote once it was fsync'd and renamed into place. NFS and
GlusterFS have formats of their own, which do add the options they need, so they are refused
here.
"""

from __future__ import annotations

from typing import Any, ClassVar

from agent import errors
from agent.repo import mounted

# What has a format of its own, because its safety depends on options posixfs would not add.
OWN_FORMATS = {"nfs": "nfs-1.0", "nfs4": "nfs-1.0", "glusterfs": "glusterfs-1.0",
               "fuse.glusterfs": "glusterfs-1.0"}


class PosixRepository(mounted.MountedRepository):
    FORMAT = "posixfs-1.0"
    PARAMETERS: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["spec", "vfsType"],
        "additionalProperties": False,
        "properties": {
            "spec": {"type": "string", "minLength": 1, "maxLength": 4000, "pattern": "^[^-]",
                     "description": "what to mount: a device, a remote share, an image file "
                                    "(with mountOptions loop), a directory (with vfsType none "
                                    "and mountOptions bind)"},
            "vfsType": {"type": "string", "maxLength": 64, "pattern": "^[a-z0-9][a-z0-9._-]*$",
                        "description": "the file system type, as for mount -t (none for a "
                                       "bind)"},
            "mountOptions": mounted.MOUNT_OPTIONS,
        },
    }

    @classmethod
    def mount_spec(cls, params: dict[str, Any]) -> mounted.MountSpec:
        vfs = params["vfsType"]
        if vfs in OWN_FORMATS:
            raise errors.InvalidArgument(
                f"connectionParameters.vfsType: {vfs} has a format of its own, "
                f"{OWN_FORMATS[vfs]}, which adds the mount options it needs to be safe on "
                "several hosts", param="connectionParameters.vfsType")
        return mounted.MountSpec(vfs, params["spec"], tuple(mounted.split_options(params)))
