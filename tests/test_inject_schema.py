"""Schema validation: what ``appliance inject`` writes, its golden inputs, and the example
manifests in docs/kubernetes/ all pass the trimmed Kubernetes 1.29 schema shipped in
tests/k8s_schema/ (see its README); and the schema does reject what an API server would.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from appliance.inject import InjectOptions, inject_text

TOP = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((TOP / "tests" / "k8s_schema" / "kubernetes-1.29.yaml").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
GOLDEN = sorted((TOP / "tests" / "golden" / "inject").glob("*.yaml"))
DOCS = sorted((TOP / "docs" / "kubernetes").glob("*.yaml"))


def errors(doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in VALIDATOR.iter_errors(doc)]


def documents(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_schema_is_a_valid_json_schema() -> None:
    """The shipped schema itself is well-formed draft 2020-12."""
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("path", GOLDEN, ids=[p.name for p in GOLDEN])
def test_golden_files_pass_the_schema(path: Path) -> None:
    """Every golden input and output is a valid set of Kubernetes objects."""
    for i, doc in enumerate(documents(path), 1):
        assert errors(doc) == [], f"{path.name} document {i}"


def test_docs_examples_exist_and_pass_the_schema() -> None:
    """docs/kubernetes/*.yaml (identity service, demo app) are valid, injected or not."""
    assert {p.name for p in DOCS} >= {"identity.yaml", "demo.yaml"}
    for path in DOCS:
        for i, doc in enumerate(documents(path), 1):
            assert errors(doc) == [], f"{path.name} document {i}"
        for native in (False, True):
            out = inject_text(path.read_text(), InjectOptions(native_sidecar=native)).text
            for i, doc in enumerate(yaml.safe_load_all(out), 1):
                assert errors(doc) == [], f"{path.name} injected (native={native}) doc {i}"


POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
       "spec": {"containers": [{"name": "app", "image": "busybox"}]}}


def _with(path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(POD)
    node: Any = doc
    *parents, leaf = path.split(".")
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[leaf] = value
    return doc


@pytest.mark.parametrize(("path", "value", "needle"), [
    ("spec.containers.0.restartPolicy", "Always", "should not be valid"),
    ("spec.containers.0.imagePullPolicy", "Sometimes", "is not one of"),
    ("spec.containers.0.ports", [{"name": "appliance-proxy-x", "containerPort": 1}],
     "is too long"),
    ("spec.containers.0.ports", [{"containerPort": 70000}], "maximum"),
    ("spec.containers.0.securityContext", {"runAsUsr": 1}, "Additional properties"),
    ("spec.containers.0.name", "App_1", "does not match"),
    ("spec.volumes", [{"name": "t", "projected": {"sources": [{"serviceAccountToken": {
        "path": "t", "expirationSeconds": 60}}]}}], "less than the minimum"),
    ("spec.volumes", [{"name": "v"}], "does not have enough properties"),
    ("spec.initContainers", [{"name": "x", "restartPolicy": "OnFailure"}], "is not one of"),
    ("metadata.annotations", {"a": 1}, "is not of type 'string'"),
])
def test_schema_rejects_what_the_api_server_would(path: str, value: Any, needle: str) -> None:
    """Each mutation of a valid pod is refused, for the stated reason."""
    assert errors(POD) == []
    found = errors(_with(path, value))
    assert any(needle in e for e in found), found
