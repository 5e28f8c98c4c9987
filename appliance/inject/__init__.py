"""``appliance inject``: the mesh added to Kubernetes manifests (docs/kubernetes.md).

``settings`` turns flags and linkerd-named annotations into validated per-pod settings,
``pod`` adds or removes the init container, the proxy and their volumes, ``manifest``
walks multi-document YAML, and ``cli`` is the command.
"""

from __future__ import annotations

from appliance.inject.manifest import InjectError, Result, inject_text
from appliance.inject.settings import AnnotationError, InjectOptions

__all__ = ["AnnotationError", "InjectError", "InjectOptions", "Result", "inject_text"]
