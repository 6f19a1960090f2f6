"""The API document is the one source of truth: the README, the error classes and the server's
methods all agree with it."""

from __future__ import annotations

import inspect
import os

from agent import api as agent_api
from agent import errors, repo
from rpc import apidoc, apimd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_api_section_is_generated_from_the_document() -> None:
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    begin, end = readme.index(apimd.BEGIN), readme.index(apimd.END) + len(apimd.END)
    assert readme[begin:end] == apimd.render(apidoc.document()), (
        "README.md's API section is stale: regenerate it with python -m rpc.apimd"
    )


def test_error_codes_match_the_error_classes() -> None:
    published = apidoc.error_codes()
    internal = {errors.OperationStopped.name}
    classes = {e.name: e.code for e in errors.ALL if e.name not in internal}
    assert published == classes
    assert len(set(classes.values())) == len(classes)


def test_every_documented_method_is_served_with_the_same_params() -> None:
    for name, method in apidoc.methods().items():
        fn = getattr(agent_api.Api, name)
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
        assert params == [p.name for p in method.params], name


def test_every_method_documents_its_errors_and_they_exist() -> None:
    codes = apidoc.error_codes()
    for m in apidoc.document()["methods"]:
        for e in m["errors"]:
            assert e["$ref"].rsplit("/", 1)[1] in codes


def test_the_document_publishes_every_format_and_its_parameters_schema() -> None:
    doc = apidoc.document()
    for m in doc["methods"]:
        if m["name"] not in ("formatStorageRepository", "connectStorageRepository"):
            continue
        params = {p["name"]: p["schema"] for p in m["params"]}
        assert params["repoFormat"]["enum"] == sorted(repo.FORMATS)
        published = params["connectionParameters"]["x-formats"]
        assert published == {name: d.PARAMETERS for name, d in sorted(repo.FORMATS.items())}
        assert "ioTimeout" in params["options"]["properties"]
