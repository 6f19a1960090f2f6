from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

from agent import config
from rpc import connections, server

UNIT = pathlib.Path(__file__).parent.parent / "systemd" / "strata-agent.service"
EXEC_START = "ExecStart=/usr/bin/strata-agent --config /etc/strata/agent.conf"


def parse(text: str) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values; unit files repeat keys, so configparser cannot read them."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture
def unit() -> dict[str, dict[str, list[str]]]:
    return parse(UNIT.read_text())


def verify(path: pathlib.Path) -> tuple[int, list[str]]:
    """Run systemd-analyze verify; return its exit code and the lines it printed about ``path``."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (no systemd on this machine)")
    result = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    # Tolerated noise is anything about other units (the distribution's own units have warnings
    # on some releases) or about the machine (containers without a running systemd).
    ours = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if path.name in line or str(path.parent) in line
    ]
    return result.returncode, ours


def runnable_copy(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    """The unit with ExecStart pointing at an executable that exists here."""
    true = shutil.which("true")
    assert true is not None
    assert EXEC_START in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace("ExecStart=/usr/bin/strata-agent", f"ExecStart={true}"))
    return copy


def test_verify_as_shipped() -> None:
    """The unit file itself, unchanged. systemd-analyze also checks that ExecStart's program
    exists: on a machine without /usr/bin/strata-agent that is the one line allowed, and it is
    about this machine, not the unit (the installed unit is verified whole below)."""
    returncode, ours = verify(UNIT)
    agent = pathlib.Path("/usr/bin/strata-agent")
    if agent.exists():
        assert (returncode, ours) == (0, [])
        return
    assert ours == [f"{UNIT.name}: Command {agent} is not executable: No such file or directory"]


def test_verify_as_installed(tmp_path: pathlib.Path) -> None:
    """The unit exactly as `make install` writes it, with a PREFIX whose bin/strata-agent exists
    here (a stub: systemd-analyze only checks that it is an executable file)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    prefix, units = tmp_path / "prefix", tmp_path / "units"
    (prefix / "bin").mkdir(parents=True)
    stub = prefix / "bin" / "strata-agent"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    subprocess.run(["make", "-s", "-C", str(UNIT.parent.parent), "install-unit",
                    f"PREFIX={prefix}", f"SYSTEMD_DIR={units}"], check=True, timeout=60)
    installed = units / UNIT.name
    assert f"ExecStart={stub} --config /etc/strata/agent.conf" in installed.read_text()
    returncode, ours = verify(installed)
    assert (returncode, ours) == (0, [])


def test_verify(tmp_path: pathlib.Path) -> None:
    returncode, ours = verify(runnable_copy(tmp_path, UNIT.read_text()))
    assert returncode == 0
    assert ours == []


def test_verify_catches_mistakes(tmp_path: pathlib.Path) -> None:
    # The check above has teeth: a misspelt key is reported although the exit code stays 0.
    text = UNIT.read_text().replace("ProtectHome=", "ProtectHom=")
    _, ours = verify(runnable_copy(tmp_path, text))
    assert any("ProtectHom" in line for line in ours), ours


def test_type_notify_and_sanlock(unit: dict[str, dict[str, list[str]]]) -> None:
    assert unit["Service"]["Type"] == ["notify"]
    assert "sanlock.service" in " ".join(unit["Unit"]["Wants"]).split()
    assert "sanlock.service" in " ".join(unit["Unit"]["After"]).split()


def test_service_settings(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    assert service["ExecStart"] == [EXEC_START.partition("=")[2]]
    assert service["Restart"] == ["on-failure"]
    assert service["KillMode"] == ["mixed"]
    assert service["RuntimeDirectory"] == ["strata"]
    assert service["RuntimeDirectoryMode"] == ["0750"]
    assert service["StateDirectory"] == ["strata"]
    assert service["ProtectSystem"] == ["full"]


def test_no_hardening_that_blocks_mounts(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    for key in ("PrivateDevices", "ProtectKernelModules", "MountFlags", "DevicePolicy"):
        assert key not in service, key
    assert "AF_NETLINK" in service["RestrictAddressFamilies"][0].split()


def test_limit_nofile_leaves_room_for_the_connection_caps(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    # Both listeners full at the default cap, their refusals under way, and the agent's own files.
    need = 2 * (config.Rpc().max_connections + connections.REFUSING) + server.OWN_FILES
    assert int(unit["Service"]["LimitNOFILE"][0]) >= need
