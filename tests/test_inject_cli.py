"""The ``appliance inject`` command: files, stdin, --output, notes and exit codes."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from appliance.cli import main

GOLDEN = Path(__file__).parent / "golden" / "inject"
POD = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: a}]}\n"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["inject", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_file_to_stdout_with_notes(capsys: pytest.CaptureFixture[str]) -> None:
    """A file is injected to stdout; stderr says what happened to each workload."""
    code, out, err = run(capsys, str(GOLDEN / "daemonset.yaml"))
    assert code == 0
    assert out == (GOLDEN / "daemonset.injected.yaml").read_text()
    assert 'daemonset "log-shipper" injected (sidecar)' in err
    assert 'daemonset "node-agent" skipped: hostNetwork is true' in err


def test_stdin_and_output_file(capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`-` reads stdin; --output writes the file and leaves stdout empty."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(POD))
    target = tmp_path / "out.yaml"
    code, out, _ = run(capsys, "-", "--output", str(target), "--no-identity")
    assert code == 0 and out == ""
    names = [c["name"] for c in yaml.safe_load(target.read_text())["spec"]["containers"]]
    assert names == ["appliance-proxy", "a"]


def test_several_files_become_one_stream(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    """Two files give one multi-document stream, in order."""
    one, two = tmp_path / "1.yaml", tmp_path / "2.yaml"
    one.write_text(POD)
    two.write_text(POD.replace("name: p", "name: q"))
    code, out, _ = run(capsys, str(one), str(two))
    assert code == 0
    assert [d["metadata"]["name"] for d in yaml.safe_load_all(out)] == ["p", "q"]


def test_uninject_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """--uninject removes what inject added."""
    code, out, err = run(capsys, "--uninject", str(GOLDEN / "statefulset.injected.yaml"))
    assert code == 0 and "appliance" not in out
    assert 'statefulset "cache" uninjected' in err


def test_bad_manifest_exits_1_and_writes_nothing(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    """Errors name the file; a missing file is reported too; stdout stays empty."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(POD.replace("[{name: a}]", "nope"))
    code, out, err = run(capsys, str(bad), str(tmp_path / "missing.yaml"))
    assert code == 1 and out == ""
    assert f"error: {bad}: document 1 (Pod p): spec.containers: expected" in err
    assert "missing.yaml: cannot read" in err


@pytest.mark.parametrize(("flags", "needle"), [
    (["--proxy-memory-limit", "lots"], "--proxy-memory-limit: 'lots' is not a Kubernetes"),
    (["--kubernetes-version", "latest"], "--kubernetes-version: 'latest' is not a version"),
    (["--proxy-uid", "0"], "--proxy-uid: 0 is not a UID"),
])
def test_bad_flags_exit_2(capsys: pytest.CaptureFixture[str], flags: list[str],
                          needle: str) -> None:
    """A bad flag value is a usage error naming the flag."""
    code, out, err = run(capsys, *flags, str(GOLDEN / "batch.yaml"))
    assert code == 2 and out == "" and needle in err


def test_job_without_native_sidecar_warns(capsys: pytest.CaptureFixture[str]) -> None:
    """A Job injected with a classic sidecar gets a warning that it will not finish."""
    _, _, err = run(capsys, str(GOLDEN / "batch.yaml"))
    assert 'job "migrate" injected (sidecar); warning: the proxy keeps each pod running' in err


def test_real_command_line() -> None:
    """`python -m appliance inject` as a user runs it, through a pipe."""
    done = subprocess.run([sys.executable, "-m", "appliance", "inject",
                           "--kubernetes-version", "1.29"], input=POD, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    spec = yaml.safe_load(done.stdout)["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["appliance-init", "appliance-proxy"]
