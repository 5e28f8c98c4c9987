"""``appliance inject`` on real-world manifest shapes: golden outputs, idempotency, exact
``--uninject``, and errors that name the file, document and field.

Goldens live in tests/golden/inject: ``NAME.yaml`` is the input, ``NAME[.VARIANT].injected.yaml``
the expected output. Regenerate after an intended change with
``APPLIANCE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_inject.py`` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from appliance.cli import build_parser
from appliance.inject import InjectError, InjectOptions, inject_text
from appliance.inject.cli import options_from_args

GOLDEN = Path(__file__).parent / "golden" / "inject"
UPDATE = os.environ.get("APPLIANCE_UPDATE_GOLDEN") == "1"

# (input name, variant, inject flags)
CASES = [
    ("helm-deployment", "", []),
    ("statefulset", "", []),
    ("daemonset", "", []),
    ("batch", "", []),
    ("batch", "native", ["--kubernetes-version", "v1.29.2"]),
    ("pod-annotated", "", []),
    ("kubectl-list", "", []),
    ("kubectl-list", "no-identity", ["--no-identity", "--image", "reg.example/appliance:1.0",
                                     "--iptables-mode", "nft"]),
]
IDS = [f"{name}{'.' + variant if variant else ''}" for name, variant, _ in CASES]


def options(*flags: str) -> InjectOptions:
    return options_from_args(build_parser().parse_args(["inject", *flags]))


def golden_path(name: str, variant: str) -> Path:
    return GOLDEN / f"{name}{'.' + variant if variant else ''}.injected.yaml"


@pytest.mark.parametrize(("name", "variant", "flags"), CASES, ids=IDS)
def test_golden(name: str, variant: str, flags: list[str]) -> None:
    """Injecting the input gives exactly the reviewed golden text."""
    out = inject_text((GOLDEN / f"{name}.yaml").read_text(), options(*flags)).text
    path = golden_path(name, variant)
    if UPDATE:
        path.write_text(out)
    assert out == path.read_text()


@pytest.mark.parametrize(("name", "variant", "flags"), CASES, ids=IDS)
def test_injecting_twice_is_a_no_op(name: str, variant: str, flags: list[str]) -> None:
    """Injecting an injected manifest with the same flags changes nothing."""
    injected = golden_path(name, variant).read_text()
    assert inject_text(injected, options(*flags)).text == injected


@pytest.mark.parametrize(("name", "variant", "flags"), CASES, ids=IDS)
def test_uninject_restores_the_input(name: str, variant: str, flags: list[str]) -> None:
    """--uninject of the golden gives back the input's data (comments aside)."""
    restored = inject_text(golden_path(name, variant).read_text(), options(),
                           uninject=True).text
    original = list(yaml.safe_load_all((GOLDEN / f"{name}.yaml").read_text()))
    assert list(yaml.safe_load_all(restored)) == original


DEPLOY = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
      annotations: {ANNOTATIONS}
    spec:
      containers: CONTAINERS
"""
OK_CONTAINERS = "[{name: web, image: nginx, ports: [{name: http, containerPort: 80}]}]"


def deploy(annotations: str = "{}", containers: str = OK_CONTAINERS) -> str:
    return DEPLOY.replace("{ANNOTATIONS}", annotations).replace("CONTAINERS", containers)


@pytest.mark.parametrize(("text", "needles"), [
    ("a: [1,\n", ["in.yaml: line 2, column 1: not valid YAML"]),
    (deploy(containers="web"), ["document 1 (Deployment shop/web)",
                                "spec.template.spec.containers: expected a non-empty list"]),
    (deploy(containers="[]"), ["spec.template.spec.containers: expected a non-empty list"]),
    (deploy(containers="[{image: x}]"),
     ["spec.template.spec.containers[0]: expected a container with a name"]),
    ("kind: Deployment\nmetadata: {name: x}\nspec: {template: 3}\n",
     ["document 1 (Deployment x): spec.template: expected a mapping, got int 3"]),
    ("kind: CronJob\nmetadata: {name: c}\nspec: {jobTemplate: {spec: {}}}\n",
     ["spec.jobTemplate.spec.template: expected a mapping, got nothing"]),
    ("kind: Pod\nmetadata: {name: p, annotations: [a]}\nspec: {containers: [{name: a}]}\n",
     ["metadata.annotations: expected a mapping"]),
    (deploy('{config.linkerd.io/skip-inbound-ports: "80,x"}'),
     ["spec.template.metadata.annotations: config.linkerd.io/skip-inbound-ports: bad port 'x'"]),
    (deploy('{config.linkerd.io/opaque-ports: "grpc"}'),
     ["config.linkerd.io/opaque-ports: 'grpc' is neither a port", "names here: http"]),
    (deploy('{config.linkerd.io/skip-subnets: "10.0.0.1/8"}'),
     ["config.linkerd.io/skip-subnets: bad subnet '10.0.0.1/8'"]),
    (deploy('{config.linkerd.io/proxy-memory-limit: "lots"}'),
     ["config.linkerd.io/proxy-memory-limit: 'lots' is not a Kubernetes quantity"]),
    (deploy('{config.linkerd.io/proxy-log-level: "loud"}'),
     ["config.linkerd.io/proxy-log-level: 'loud' has no level we know"]),
    (deploy('{config.linkerd.io/proxy-uid: "0"}'),
     ["config.linkerd.io/proxy-uid: '0' is not an integer 1-"]),
    (deploy('{config.linkerd.io/admin-port: "4143"}'), ["must be three different ports"]),
    (deploy('{config.linkerd.io/image-pull-policy: "Sometimes"}'),
     ["image-pull-policy: 'Sometimes' is not one of Always, IfNotPresent, Never"]),
    (deploy('{config.linkerd.io/skip-outbound-port: "1"}'),
     ["config.linkerd.io/skip-outbound-port: unknown annotation; did you mean "
      "config.linkerd.io/skip-outbound-ports?"]),
    (deploy('{config.appliance.io/http.respons_timeout: "1s"}'),
     ["config.appliance.io/http.respons_timeout: 'http.respons_timeout' is not a config field"]),
    (deploy('{config.appliance.io/http.response_timeout: "soon"}'),
     ["APPLIANCE_HTTP_RESPONSE_TIMEOUT", "'soon' is not a duration"]),
    (deploy('{config.linkerd.io/proxy-outbound-connect-timeout: "1 fortnight"}'),
     ["APPLIANCE_OUTBOUND_CONNECT_TIMEOUT"]),
    (deploy('{linkerd.io/inject: "ingress"}'), ["linkerd.io/inject: 'ingress' is not enabled"]),
    (deploy('{config.linkerd.io/trace-collector: "collector"}'),
     ["trace-collector: 'collector' is not HOST:PORT"]),
    (deploy('{config.beta.linkerd.io/proxy-enable-native-sidecar: "yes"}'),
     ["proxy-enable-native-sidecar: 'yes' is not true/false"]),
])
def test_errors_name_source_document_and_field(text: str, needles: list[str]) -> None:
    """Bad manifests raise InjectError whose message names where and what is wrong."""
    with pytest.raises(InjectError) as info:
        inject_text(text, InjectOptions(), source="in.yaml")
    message = str(info.value)
    assert message.startswith("in.yaml: "), message
    for needle in needles:
        assert needle in message, message


def test_every_problem_is_reported_and_nothing_is_written() -> None:
    """Two bad documents among good ones give two problems, with their numbers."""
    text = "\n---\n".join([deploy(), deploy(containers="5"), "kind: Service\n",
                           deploy('{config.linkerd.io/proxy-uid: "x"}')])
    with pytest.raises(InjectError) as info:
        inject_text(text, InjectOptions(), source="in.yaml")
    assert [p.split(":")[1].strip() for p in info.value.problems] == [
        "document 2 (Deployment shop/web)", "document 4 (Deployment shop/web)"]


def test_native_sidecar_annotation_refused_on_an_old_cluster() -> None:
    """The native-sidecar annotation with --kubernetes-version 1.28 is an error."""
    opts = options("--kubernetes-version", "1.28")
    with pytest.raises(InjectError, match="native sidecars need Kubernetes >= 1.29, "
                                          "--kubernetes-version is 1.28"):
        inject_text(deploy('{config.beta.linkerd.io/proxy-enable-native-sidecar: "true"}'),
                    opts)


ALPHA = "config.alpha.linkerd.io/proxy-enable-native-sidecar"
BETA = "config.beta.linkerd.io/proxy-enable-native-sidecar"


@pytest.mark.parametrize(("flags", "annotations", "native"), [
    ([], "{}", False),
    (["--kubernetes-version", "1.28"], "{}", False),
    (["--kubernetes-version", "1.29"], "{}", True),
    (["--kubernetes-version", "1.30.1"], "{}", True),
    (["--native-sidecar"], "{}", True),
    (["--kubernetes-version", "1.30", "--no-native-sidecar"], "{}", False),
    ([], f'{{{ALPHA}: "true"}}', True),
    (["--kubernetes-version", "1.31"], f'{{{BETA}: "false"}}', False),
])
def test_native_sidecar_choice(flags: list[str], annotations: str, native: bool) -> None:
    """Flags, the cluster version and linkerd's annotation decide where the proxy goes."""
    out = yaml.safe_load(inject_text(deploy(annotations), options(*flags)).text)
    spec = out["spec"]["template"]["spec"]
    inits = [c["name"] for c in spec["initContainers"]]
    apps = [c["name"] for c in spec["containers"]]
    if native:
        assert inits == ["appliance-init", "appliance-proxy"] and apps == ["web"]
        assert spec["initContainers"][1]["restartPolicy"] == "Always"
    else:
        assert inits == ["appliance-init"] and apps == ["appliance-proxy", "web"]


def test_other_kinds_and_empty_documents_pass_through() -> None:
    """Services, ConfigMaps and CRDs are written back unchanged; empty documents dropped."""
    text = ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {k: v}\n---\n---\n"
            "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n"
            "spec: {template: {spec: {containers: []}}}\n")
    result = inject_text(text, InjectOptions())
    assert list(yaml.safe_load_all(result.text)) == [
        d for d in yaml.safe_load_all(text) if d is not None]
    assert result.notes == []
