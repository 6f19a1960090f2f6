"""The driver contract: the engine knows repository formats only through agent.repo.contract."""

from __future__ import annotations

import ast
import os
from typing import Any

import pytest

from agent import repo
from agent.repo import contract, localfs
from tests.conftest import ROOT

ENGINE = ["agent/image", "agent/fix", "agent/api.py", "agent/host.py"]


def _engine_files() -> list[str]:
    out = []
    for part in ENGINE:
        path = os.path.join(ROOT, part)
        if os.path.isfile(path):
            out.append(path)
            continue
        out += [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(".py")]
    return out


def test_no_engine_module_names_a_concrete_driver() -> None:
    drivers = {name for name in os.listdir(os.path.join(ROOT, "agent/repo"))
               if name.endswith(".py")} - {"__init__.py", "contract.py", "layout.py",
                                           # the lease layer the contract's claims use,
                                           # the same for every shared format
                                           "leases.py", "lockspace.py"}
    assert "localfs.py" in drivers
    modules = {f"agent.repo.{n[:-3]}" for n in drivers}
    stems = {n[:-3] for n in drivers}
    found = []
    for path in _engine_files():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [(path, a.name) for a in node.names if a.name in modules]
            elif isinstance(node, ast.ImportFrom):
                if node.module in modules:
                    found.append((path, node.module))
                elif node.module == "agent.repo":
                    found += [(path, a.name) for a in node.names if a.name in stems]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in stems:
                found.append((path, f"{node.value.id}.{node.attr}"))
    assert found == []


def test_every_format_implements_the_whole_contract() -> None:
    assert repo.FORMATS
    for name, driver in repo.FORMATS.items():
        assert issubclass(driver, contract.Repository)
        assert name == driver.FORMAT
        assert not getattr(driver, "__abstractmethods__", None), name
        assert all(isinstance(c, contract.Capability) for c in driver.CAPABILITIES)
        assert driver.PARAMETERS["type"] == "object"
        assert driver.PARAMETERS.get("additionalProperties") is False, name


@pytest.mark.parametrize(("params", "key"), [
    ({}, "connectionParameters.path"),
    ({"path": "relative"}, "connectionParameters.path"),
    ({"path": 5}, "connectionParameters.path"),
    ({"path": "/x", "server": "a"}, "connectionParameters.server"),
])
def test_bad_parameters_are_refused_naming_the_key_before_anything_is_made(
        tmp_path: Any, params: dict[str, Any], key: str) -> None:
    from agent import errors
    with pytest.raises(errors.InvalidArgument) as e:
        localfs.LocalRepository.format(params, {}, str(tmp_path / "run"))
    assert e.value.message.startswith(f"{key}: ")
    assert e.value.data["param"] == key
    assert os.listdir(tmp_path) == []
