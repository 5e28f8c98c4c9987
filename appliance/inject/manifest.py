"""Kubernetes manifests in, manifests out: find every pod template and (un)inject it.

Theory of operation. The input is YAML text holding one or more documents (``---``); a
document of kind ``List`` (or ``DeploymentList`` and the like) holds more in ``items``.
Each document is parsed with PyYAML's safe loader (key order kept), its pod template is
found by kind (``WORKLOADS``), checked just enough to be edited safely, handed to
``appliance.inject.pod``, and the documents are written back in order. Documents of other
kinds (Services, ConfigMaps, ...) pass through unchanged. Problems are collected, every one
naming the source, the document (number, kind, namespace/name) and the field path, and
raised together as one ``InjectError`` so nothing half-injected is ever written. YAML
comments are not preserved (PyYAML drops them); the data is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from appliance.inject import pod
from appliance.inject.settings import (
    AnnotationError,
    InjectOptions,
    container_port_names,
    needs_injection,
    pod_settings,
)

# kind -> keys from the document to the pod template (empty: the document is the pod)
WORKLOADS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


class InjectError(Exception):
    """One or more documents cannot be (un)injected; one problem per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class Result:
    """The rewritten text and one note per pod template (what happened to it)."""

    text: str
    notes: list[str] = field(default_factory=list)


@dataclass
class _Doc:
    """Where we are, for messages: ``document 2 (Deployment shop/web)`` or an item."""

    label: str
    kind: str
    name: str


def inject_text(text: str, opts: InjectOptions, *, source: str = "-",
                uninject: bool = False) -> Result:
    """Inject (or uninject) every pod template in ``text``; InjectError lists problems."""
    docs = load_documents(text, source)
    notes: list[str] = []
    problems: list[str] = []

    def edit(doc: dict[str, Any], where: _Doc) -> None:
        try:
            notes.append(_edit_workload(doc, where, opts, uninject))
        except _Problem as exc:
            problems.append(f"{source}: {where.label}: {exc}")

    for index, doc in enumerate(docs, 1):
        for item, where in _workloads(doc, f"document {index}"):
            edit(item, where)
    if problems:
        raise InjectError(problems)
    return Result(dump_documents(docs), notes)


class _Problem(ValueError):
    """A problem inside one document: the message starts with the field path."""


def load_documents(text: str, source: str) -> list[Any]:
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise InjectError([f"{source}: {where}not valid YAML ({problem})"]) from None


def _workloads(doc: Any, label: str) -> Iterator[tuple[dict[str, Any], _Doc]]:
    """Each workload document, descending into List items."""
    if not isinstance(doc, dict):
        return
    kind = doc.get("kind")
    if isinstance(kind, str) and kind.endswith("List") and isinstance(doc.get("items"), list):
        for i, item in enumerate(doc["items"]):
            yield from _workloads(item, f"{label} items[{i}]")
        return
    if kind in WORKLOADS:
        found = doc.get("metadata")
        meta: dict[str, Any] = found if isinstance(found, dict) else {}
        name = str(meta.get("name", "?"))
        ns = meta.get("namespace")
        full = f"{ns}/{name}" if ns else name
        yield doc, _Doc(f"{label} ({kind} {full})", str(kind), name)


def _edit_workload(doc: dict[str, Any], where: _Doc, opts: InjectOptions,
                   uninject: bool) -> str:
    path = WORKLOADS[where.kind]
    template = _walk(doc, path)
    meta_path = ".".join((*path, "metadata")) if path else "metadata"
    spec_path = ".".join((*path, "spec")) if path else "spec"
    meta = template.get("metadata")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise _Problem(f"{meta_path}: expected a mapping, got {_type(meta)}")
    spec = template.get("spec")
    if not isinstance(spec, dict):
        raise _Problem(f"{spec_path}: expected a mapping (the pod spec), got {_type(spec)}")
    _check_containers(spec, spec_path)
    label = f'{where.kind.lower()} "{where.name}"'
    if uninject:
        had = pod.uninject_pod(meta, spec)
        if not meta and "metadata" in template:
            del template["metadata"]
        return f"{label} uninjected" if had else f"{label}: nothing to uninject"
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise _Problem(f"{meta_path}.annotations: expected a mapping, got {_type(annotations)}")
    try:
        if not needs_injection(annotations):
            return f'{label} skipped: annotation linkerd.io/inject is "disabled"'
        if spec.get("hostNetwork") is True:
            return (f"{label} skipped: hostNetwork is true (the init container would "
                    "rewrite the node's own iptables)")
        settings = pod_settings(opts, annotations, workload=where.name,
                                named_ports=container_port_names(spec["containers"]))
    except AnnotationError as exc:
        raise _Problem(f"{meta_path}.annotations: {exc}") from None
    again = pod.is_injected(spec)
    if "metadata" not in template:  # attach it where kubectl would print it: first
        rest = dict(template)
        template.clear()
        template.update({"metadata": meta, **rest})
    pod.inject_pod(meta, spec, settings)
    mode = "native sidecar" if settings.native_sidecar else "sidecar"
    note = f"{label} {'re-injected' if again else 'injected'} ({mode})"
    if where.kind in ("Job", "CronJob") and not settings.native_sidecar:
        note += ("; warning: the proxy keeps each pod running after the job's containers "
                 "exit (use --kubernetes-version 1.29+ for a native sidecar)")
    return note


def _walk(doc: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node: Any = doc
    for depth, key in enumerate(path):
        child = node.get(key)
        if not isinstance(child, dict):
            at = ".".join(path[: depth + 1])
            raise _Problem(f"{at}: expected a mapping, got {_type(child)}")
        node = child
    return node  # type: ignore[no-any-return]


def _check_containers(spec: dict[str, Any], spec_path: str) -> None:
    for key in ("containers", "initContainers"):
        items = spec.get(key)
        if items is None and key == "initContainers":
            continue
        if not isinstance(items, list) or (key == "containers" and not items):
            raise _Problem(f"{spec_path}.{key}: expected a non-empty list of containers, "
                           f"got {_type(items)}")
        for i, c in enumerate(items):
            if not isinstance(c, dict) or not isinstance(c.get("name"), str):
                raise _Problem(f"{spec_path}.{key}[{i}]: expected a container with a "
                               f"name, got {_type(c)}")
    for key in ("volumes",):
        if spec.get(key) is not None and not isinstance(spec[key], list):
            raise _Problem(f"{spec_path}.{key}: expected a list, got {_type(spec[key])}")


def _type(value: Any) -> str:
    if value is None:
        return "nothing"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


class _Dumper(yaml.SafeDumper):
    """kubectl-like output: list items indented under their key, multi-line strings as
    literal blocks."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:
        return super().increase_indent(flow, False)


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value and not any(c in value for c in "\t\r") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_documents(docs: list[Any]) -> str:
    dump: Callable[..., str] = yaml.dump_all
    return dump(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                explicit_start=len(docs) > 1, allow_unicode=True, width=100)
