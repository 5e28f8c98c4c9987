"""Properties of ``appliance inject`` over generated pods: injecting is idempotent,
``--uninject`` is its exact inverse, and the pod's own containers keep their order."""

from __future__ import annotations

import copy
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.inject import InjectOptions, inject_text
from appliance.inject.manifest import dump_documents

NAMES = st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True)
ANNOTATIONS = st.fixed_dictionaries({}, optional={
    "config.linkerd.io/skip-inbound-ports": st.sampled_from(["22", "8000-8010", "22,9000"]),
    "config.linkerd.io/skip-outbound-ports": st.sampled_from(["5432", "3306,6379"]),
    "config.linkerd.io/opaque-ports": st.sampled_from(["4000", "4000-4002"]),
    "config.linkerd.io/proxy-cpu-limit": st.sampled_from(["1", "500m"]),
    "config.linkerd.io/proxy-log-level": st.sampled_from(["debug", "warn,linkerd=info"]),
    "config.beta.linkerd.io/proxy-enable-native-sidecar": st.sampled_from(["true", "false"]),
    "prometheus.io/scrape": st.just("true"),
})


@st.composite
def pods(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    split = draw(st.integers(0, len(names) - 1))
    spec: dict[str, Any] = {"containers": [{"name": n, "image": "busybox"}
                                           for n in names[split:]]}
    if split:
        spec["initContainers"] = [{"name": n, "image": "busybox"} for n in names[:split]]
    vols = draw(st.lists(NAMES, max_size=2, unique=True))
    if vols:
        spec["volumes"] = [{"name": v, "emptyDir": {}} for v in vols]
    meta: dict[str, Any] = {"name": draw(NAMES)}
    annotations = draw(ANNOTATIONS)
    if annotations:
        meta["annotations"] = annotations
    kind = draw(st.sampled_from(["Pod", "Deployment", "CronJob"]))
    if kind == "Pod":
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}
    template = {"metadata": {k: v for k, v in meta.items() if k != "name"}, "spec": spec}
    if not template["metadata"]:
        del template["metadata"]
    if kind == "Deployment":
        return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": meta["name"]},
                "spec": {"selector": {}, "template": template}}
    return {"apiVersion": "batch/v1", "kind": kind, "metadata": {"name": meta["name"]},
            "spec": {"schedule": "@daily", "jobTemplate": {"spec": {"template": template}}}}


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "Pod":
        return doc["spec"]  # type: ignore[no-any-return]
    if doc["kind"] == "Deployment":
        return doc["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]


@settings(max_examples=150, deadline=None)
@given(pods(), st.booleans())
def test_inject_is_idempotent_and_uninject_inverts_it(doc: dict[str, Any],
                                                      native: bool) -> None:
    """inject(inject(x)) == inject(x) and uninject(inject(x)) == x, for any flags."""
    opts = InjectOptions(native_sidecar=native)
    text = dump_documents([copy.deepcopy(doc)])
    once = inject_text(text, opts).text
    assert inject_text(once, opts).text == once
    assert yaml.safe_load(inject_text(once, opts, uninject=True).text) == doc


@settings(max_examples=150, deadline=None)
@given(pods(), st.booleans())
def test_own_containers_keep_their_order(doc: dict[str, Any], native: bool) -> None:
    """The pod's containers and init containers are all there, in order; ours once each."""
    out = yaml.safe_load(inject_text(dump_documents([doc]),
                                     InjectOptions(native_sidecar=native)).text)
    before, after = pod_spec(doc), pod_spec(out)
    every = [c["name"] for k in ("initContainers", "containers") for c in after.get(k, [])]
    assert every.count("appliance-proxy") == 1 and every.count("appliance-init") == 1
    for key in ("initContainers", "containers"):
        mine = [c["name"] for c in after.get(key, []) if not c["name"].startswith("appliance-")]
        assert mine == [c["name"] for c in before.get(key, [])]
    assert every.index("appliance-init") < every.index("appliance-proxy") or not any(
        c["name"] == "appliance-proxy" for c in after.get("initContainers", []))
