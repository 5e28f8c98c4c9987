"""Add the init container, the proxy and their volumes to a pod spec, or take them out.

Theory of operation. Everything we add carries a fixed name (``appliance-init``,
``appliance-proxy``, volumes ``appliance-*``), so ``uninject_pod`` can remove exactly what
``inject_pod`` added, and ``inject_pod`` starts by removing it: injecting an injected pod
rebuilds the same objects from the same settings, so a second run is a no-op and a run with
changed annotations or flags updates the pod in place.

Placement. Classic sidecar: the proxy is the first app container, with a postStart hook
that waits for ``/ready`` (Kubernetes starts the next container only after the hook
returns), and ``appliance-init`` is the *last* init container, so the pod's own init
containers run before any redirect exists (linkerd puts its init first, which breaks init
containers that use the network). Native sidecar (Kubernetes >= 1.29): ``appliance-init``
first, then the proxy as an init container with ``restartPolicy: Always`` and a startup
probe on ``/ready``, then the pod's own init containers, which are thus meshed too; the pod
finishes when its app containers do, so Jobs complete.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from appliance import __version__
from appliance.inject.settings import PodSettings

INIT_NAME = "appliance-init"
PROXY_NAME = "appliance-proxy"
XTABLES_VOLUME = "appliance-init-xtables-lock"
TOKEN_VOLUME = "appliance-identity-token"
ANCHORS_VOLUME = "appliance-trust-anchors"
OUR_VOLUMES = (XTABLES_VOLUME, TOKEN_VOLUME, ANCHORS_VOLUME)
OUR_CONTAINERS = (INIT_NAME, PROXY_NAME)
VERSION_ANNOTATION = "appliance.io/proxy-version"
TOKEN_DIR = "/var/run/appliance/identity"
TOKEN_FILE = "token"
ANCHORS_DIR = "/var/run/appliance/trust-anchors"
ANCHORS_KEY = "trust-anchor.pem"
PROBE = "/opt/appliance/bin/appliance-probe"
Obj = MutableMapping[str, Any]


def inject_pod(meta: Obj, spec: Obj, s: PodSettings) -> None:
    """Add (or rebuild) our containers, volumes and annotation in place."""
    uninject_pod(meta, spec)
    init = init_container(s)
    proxy = proxy_container(s)
    inits = list(spec.get("initContainers") or [])
    if s.native_sidecar:
        spec["initContainers"] = [init, proxy, *inits]
    else:
        spec["initContainers"] = [*inits, init]
        spec["containers"] = [proxy, *spec["containers"]]
    spec["volumes"] = [*(spec.get("volumes") or []), *volumes(s)]
    annotations = meta.setdefault("annotations", {})
    annotations[VERSION_ANNOTATION] = __version__


def uninject_pod(meta: Obj, spec: Obj) -> bool:
    """Remove what ``inject_pod`` adds; True if anything was there. Lists and the
    annotations map that end up empty are removed."""
    found = False
    for key, names in (("initContainers", OUR_CONTAINERS), ("containers", OUR_CONTAINERS),
                       ("volumes", OUR_VOLUMES)):
        items = spec.get(key)
        if not isinstance(items, list):
            continue
        kept = [i for i in items if not (isinstance(i, dict) and i.get("name") in names)]
        found = found or len(kept) != len(items)
        if kept or key == "containers":
            spec[key] = kept
        else:
            del spec[key]
    annotations = meta.get("annotations")
    if isinstance(annotations, dict) and VERSION_ANNOTATION in annotations:
        del annotations[VERSION_ANNOTATION]
        found = True
        if not annotations:
            del meta["annotations"]
    return found


def is_injected(spec: Obj) -> bool:
    return any(isinstance(c, dict) and c.get("name") == PROXY_NAME
               for key in ("initContainers", "containers") for c in spec.get(key) or [])


def init_container(s: PodSettings) -> dict[str, Any]:
    args = ["init", "--proxy-uid", str(s.proxy_uid), "--inbound-port", str(s.inbound_port),
            "--outbound-port", str(s.outbound_port)]
    if s.proxy_gid is not None:
        args += ["--proxy-gid", str(s.proxy_gid)]
    # init always skips 4190/4191 inbound; a moved admin port must be skipped too
    skip_in = (_join(s.skip_inbound_ports, str(s.admin_port)) if s.admin_port != 4191
               else s.skip_inbound_ports)
    for flag, value in (("--skip-inbound-ports", skip_in),
                        ("--skip-outbound-ports", s.skip_outbound_ports),
                        ("--skip-subnets", s.skip_subnets),
                        ("--skip-outbound-subnets", s.skip_outbound_subnets)):
        if value:
            args += [flag, value]
    if s.iptables_mode != "auto":
        args += ["--iptables-mode", s.iptables_mode]
    return {
        "name": INIT_NAME,
        "image": s.init_image,
        "imagePullPolicy": s.image_pull_policy,
        "args": args,
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"},
                      "limits": {"memory": "128Mi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": False,
            "runAsUser": 0,
            "runAsGroup": 0,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": XTABLES_VOLUME, "mountPath": "/run"}],
    }


def proxy_container(s: PodSettings) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": PROXY_NAME,
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "args": ["proxy"],
        "env": proxy_env(s),
        "ports": [{"name": "appliance-proxy", "containerPort": s.inbound_port},
                  {"name": "appliance-admin", "containerPort": s.admin_port}],
        "livenessProbe": _probe(s, "/live", initialDelaySeconds=10),
        "readinessProbe": _probe(s, "/ready", initialDelaySeconds=2),
    }
    if s.native_sidecar:
        c["restartPolicy"] = "Always"
        c["startupProbe"] = _probe(s, "/ready", periodSeconds=1, failureThreshold=120)
    lifecycle = _lifecycle(s)
    if lifecycle:
        c["lifecycle"] = lifecycle
    if s.resources:
        c["resources"] = s.resources
    security: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": s.proxy_uid,
        "runAsGroup": s.proxy_gid if s.proxy_gid is not None else s.proxy_uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    c["securityContext"] = security
    c["terminationMessagePolicy"] = "FallbackToLogsOnError"
    if s.identity:
        c["volumeMounts"] = [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": ANCHORS_VOLUME, "mountPath": ANCHORS_DIR, "readOnly": True}]
    return c


def proxy_env(s: PodSettings) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "APPLIANCE_INSTANCE_ID",
         "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    if s.identity:
        env += [{"name": "APPLIANCE_IDENTITY_ADDR", "value": s.identity_addr},
                {"name": "APPLIANCE_TRUST_ANCHORS", "value": f"{ANCHORS_DIR}/{ANCHORS_KEY}"},
                {"name": "APPLIANCE_IDENTITY_TOKEN_FILE", "value": f"{TOKEN_DIR}/{TOKEN_FILE}"}]
    env += [{"name": k, "value": v} for k, v in s.env.items()]
    if s.tracing:
        env += [{"name": "_pod_ns",
                 "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "OTEL_RESOURCE_ATTRIBUTES",
                 "value": "k8s.namespace.name=$(_pod_ns),k8s.pod.name=$(APPLIANCE_INSTANCE_ID)"}]
    return env


def volumes(s: PodSettings) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"name": XTABLES_VOLUME, "emptyDir": {}}]
    if s.identity:
        out += [
            {"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
                "audience": s.identity_audience,
                "expirationSeconds": s.token_expiration_seconds,
                "path": TOKEN_FILE}}]}},
            {"name": ANCHORS_VOLUME, "configMap": {"name": s.trust_anchors_configmap}}]
    return out


def _probe(s: PodSettings, path: str, **extra: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": s.admin_port}, **extra}


def _lifecycle(s: PodSettings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if s.await_ready and not s.native_sidecar:
        out["postStart"] = {"exec": {"command": [
            PROBE, "/ready", "--port", str(s.admin_port), "--wait", "120"]}}
    if s.wait_before_exit:
        out["preStop"] = {"exec": {"command": ["sleep", str(s.wait_before_exit)]}}
    return out


def _join(*parts: str) -> str:
    return ",".join(p for p in parts if p)
