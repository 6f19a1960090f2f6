"""The README's command blocks, pasted in order into bash against a fresh ``strata-agent --dev``.

What is run: every ```` ```sh ```` block of "Quick start" after the one with ``make run`` (that one
starts the agent, which the ``daemon`` fixture does here), then every ```` ```sh ```` block of
"Using the CLI", in the order they appear, in one bash with ``set -euo pipefail`` so that any
command that fails stops it. Only these substitutions are made, so the text tested is the text
an operator pastes:

- ``$PWD/.strata-dev`` becomes the fixture's --dev directory (``make run`` uses .strata-dev);
- the ``alias strata-client=...`` line is dropped: ``strata-client`` is a bash function that runs
  ``python -m rpc.client`` from this checkout (the alias names the virtualenv ``make`` builds);
- ``/srv/strata/r2`` becomes a directory under the test's tmp_path.

Then the test checks what the walkthrough promises, by the bytes where there are bytes.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import Any

import pytest

from tests import qemu
from tests.conftest import ROOT, Daemon

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

README = os.path.join(ROOT, "README.md")
GiB = qemu.GiB


def section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


def walkthrough() -> list[str]:
    with open(README) as f:
        text = f.read()
    quick = [b for b in sh_blocks(section(text, "Quick start")) if "make run" not in b]
    cli = sh_blocks(section(text, "Using the CLI"))
    assert quick and cli, "the README lost its command blocks"
    return quick + cli


def script(blocks: list[str], dev: str, r2: str) -> str:
    lines = [
        "set -euo pipefail",
        "set -x",
        f"strata-client() {{ PYTHONPATH={shlex.quote(ROOT)} "
        f"{shlex.quote(sys.executable)} -m rpc.client \"$@\"; }}",
    ]
    for block in blocks:
        for line in block.splitlines():
            if line.startswith("alias strata-client="):
                continue
            lines.append(line.replace("$PWD/.strata-dev", shlex.quote(dev))
                         .replace("/srv/strata/r2", r2))
    # What the checks below need from the walkthrough's variables.
    lines.append('printf \'%s\\n\' "disk=$disk" "snap=$snap" "snap2=$snap2" "thin=$thin" '
                 '"full=$full" > "$README_VARS"')
    return "\n".join(lines) + "\n"


def test_the_blocks_extracted_are_the_walkthrough() -> None:
    blocks = walkthrough()
    text = "\n".join(blocks)
    assert "export STRATA_SOCKET=$PWD/.strata-dev/agent.sock" in text
    for needed in ("formatStorageRepository", "stopOperation", "fixStorageRepository",
                   "removeImage", "/srv/strata/r2"):
        assert needed in text


def test_readme_blocks_run_in_order(daemon: Daemon, tmp_path: Any) -> None:
    if shutil.which("jq") is None:
        pytest.skip("jq is not installed (make test installs it)")
    r2 = str(tmp_path / "srv" / "r2")
    vars_path = tmp_path / "vars"
    p = subprocess.run(
        ["bash", "-c", script(walkthrough(), daemon.dir, r2)],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        # The README exports STRATA_SOCKET itself: a wrong one here proves it does.
        env={**os.environ, "STRATA_SOCKET": "/nonexistent", "README_VARS": str(vars_path)},
    )
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr[-6000:]}\n{daemon.read_log()}"
    names = dict(line.split("=", 1) for line in vars_path.read_text().splitlines())

    # Pause, resume: the copy was caught running and stopped by the client, and --all resumed
    # it, its progress on stderr.
    assert "last_error: stopped by client" in p.stdout, p.stdout
    assert re.search(r"mend +resume copyImage of snapshot " + names["snap2"], p.stdout)
    progress = [line for line in p.stderr.splitlines() if line.startswith("[")]
    assert any("stage 1/2" in line and "copyImage" in line for line in progress), p.stderr
    # Every copy reads what the disk held when it was snapshotted.
    written = [(0x5A, 0, GiB), (0x5A, GiB, GiB), (0xA5, 2 * GiB, GiB), (0xA5, 3 * GiB, GiB)]
    copy2 = daemon.path("r2", names["snap2"])
    for pattern, offset, length in written:
        assert qemu.reads(copy2, pattern, offset, length)
    assert qemu.same_content(copy2, daemon.path("default", names["snap2"]))
    assert qemu.reads(daemon.path("r2", names["snap"]), 0, 0, GiB)  # copied before the writes
    assert qemu.check_clean(copy2)
    # Removed and cleaned: thin is gone and nothing is left to do.
    listed = {i["imageId"] for i in daemon.call("listImages", "default")}
    assert names["thin"] not in listed and {names["disk"], names["full"]} <= listed
    assert daemon.call("checkStorageRepository", "default") == []
    assert daemon.call("checkStorageRepository", "r2") == []
    assert daemon.call("getImageStatus", "r2", names["snap2"])["status"] == "optimized"
