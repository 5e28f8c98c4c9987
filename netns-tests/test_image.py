"""The container image: static facts of the Containerfile and its pins (always), and a real
build with podman checked by init/image/check.py (only with APPLIANCE_IMAGE_TEST=1: it
takes minutes, and the first run also debootstraps a base image).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[1]
IMAGE_DIR = TOP / "init" / "image"
CONTAINERFILE = (TOP / "Containerfile").read_text()
SLOW = os.environ.get("APPLIANCE_IMAGE_TEST") == "1"
EXPECTED_CHECKS = {"user", "entrypoint", "healthcheck", "read-only-root", "version",
                   "init-dry-run", "pip-check", "init-legacy", "init-nft", "proxy-ready",
                   "healthcheck-live", "proxy-forward", "proxy-uid", "proxy-exit"}


def _pins(name: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (IMAGE_DIR / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([0-9][0-9A-Za-z.\-+]*)", line)
            assert match, f"{name}: {line!r} is not pinned as NAME==VERSION"
            pins[match[1].lower()] = match[2]
    return pins


def _dist_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def test_base_image_is_a_build_argument() -> None:
    """Every FROM uses ${BASE}, declared by an ARG before the first FROM."""
    froms = re.findall(r"^FROM\s+(\S+)", CONTAINERFILE, re.M)
    assert froms and all(f == "${BASE}" for f in froms)
    assert CONTAINERFILE.index("ARG BASE=") < CONTAINERFILE.index("FROM ")


def test_runs_as_proxy_uid_with_healthcheck() -> None:
    """The final stage runs as 2102:2102, has a health check and `appliance proxy`."""
    final = CONTAINERFILE[CONTAINERFILE.rindex("FROM "):]
    assert re.search(r"^USER 2102:2102$", final, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*appliance-probe", final, re.M)
    assert 'ENTRYPOINT ["appliance"]' in final and 'CMD ["proxy"]' in final
    assert "PYTHONDONTWRITEBYTECODE=1" in final  # read-only root filesystem


def test_every_dependency_is_pinned() -> None:
    """Each pyproject dependency has an exact pin in requirements.lock, no pin twice."""
    deps = tomllib.loads((TOP / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = _pins("requirements.lock")
    missing = [d for d in deps if _dist_name(d) not in pins]
    assert not missing, f"pin these in init/image/requirements.lock: {missing}"
    tools = _pins("build-tools.lock")
    assert {"pip", "setuptools", "wheel"} <= set(tools)
    assert "--no-deps" in CONTAINERFILE and "requirements.lock" in CONTAINERFILE


@pytest.mark.skipif(not SLOW, reason="slow: builds the image with podman; "
                                     "set APPLIANCE_IMAGE_TEST=1 to run it")
@pytest.mark.timeout(1500)
def test_built_image_works_read_only_as_both_roles() -> None:
    """podman build, then inside the mounted image (read-only, chroot): --version, init
    (dry run, legacy, nft, uninstall), pip check, and the proxy as 2102 forwarding."""
    missing = [t for t in ("podman", "debootstrap", "unshare", "chroot", "curl")
               if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)} (apt-get install podman "
                    "debootstrap curl)")
    image = f"localhost/appliance:test-{os.getpid()}"
    try:
        built = subprocess.run([str(IMAGE_DIR / "build.sh"), image], capture_output=True,
                               text=True, timeout=1200)
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
        done = subprocess.run([sys.executable, str(IMAGE_DIR / "check.py"), image, "--json"],
                              capture_output=True, text=True, timeout=300)
        result = json.loads(done.stdout)
        failed = [c for c in result["checks"] if not c["ok"]]
        assert not failed, json.dumps(failed, indent=1)
        assert {c["name"] for c in result["checks"]} == EXPECTED_CHECKS
        assert done.returncode == 0
    finally:
        subprocess.run(["podman", "image", "rm", "-f", image], capture_output=True)
