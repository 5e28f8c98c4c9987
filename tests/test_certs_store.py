"""certs.store, certs.inspection and the ``appliance certs`` CLI functions."""

from __future__ import annotations

import argparse
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from certs import cli, inspection, pki, store

NOW = datetime.now(UTC).replace(microsecond=0)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="appliance")
    sub = parser.add_subparsers(dest="command")
    cli.add_parser(sub)
    cli.add_identity_parser(sub)
    return parser.parse_args(argv)


def _run(argv: list[str]) -> int:
    args = _parse(argv)
    return int(args.func(args))


def test_init_writes_four_files_with_modes(tmp_path: Path) -> None:
    """init writes the anchor and issuer; keys are 0600 and certificates 0644, even under a
    permissive umask, and nothing temporary is left behind."""
    old = os.umask(0)
    try:
        paths = store.init(tmp_path / "d", "example.org", now=NOW)
    finally:
        os.umask(old)
    names = sorted(p.name for p in paths)
    assert names == ["issuer.key", "issuer.pem", "trust-anchor.key", "trust-anchor.pem"]
    assert sorted(os.listdir(tmp_path / "d")) == names
    assert _mode(tmp_path / "d" / store.ANCHOR_KEY) == 0o600
    assert _mode(tmp_path / "d" / store.ISSUER_KEY) == 0o600
    assert _mode(tmp_path / "d" / store.ANCHOR_CERT) == 0o644
    issuer = store.load_issuer(tmp_path / "d", now=NOW)
    assert issuer.trust_domain == "example.org"


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    """A second init fails naming the existing files; --force replaces them."""
    store.init(tmp_path, "example.org", now=NOW)
    first = (tmp_path / store.ANCHOR_CERT).read_bytes()
    with pytest.raises(store.StoreError, match="trust-anchor.pem.*already exist"):
        store.init(tmp_path, "example.org", now=NOW)
    store.init(tmp_path, "example.org", now=NOW, force=True)
    assert (tmp_path / store.ANCHOR_CERT).read_bytes() != first


def test_rotate_issuer_keeps_anchor_and_old_leaves(tmp_path: Path) -> None:
    """Rotation makes a new issuer under the same anchor; a leaf from the old issuer still
    verifies against the (unchanged) anchor with its own chain."""
    store.init(tmp_path, "example.org", now=NOW)
    anchor_pem = (tmp_path / store.ANCHOR_CERT).read_bytes()
    old = store.load_issuer(tmp_path, now=NOW)
    leaf = pki.issue_leaf(pki.new_key().public_key(), old.cert, old.key, now=NOW,
                          uri="spiffe://example.org/ns/a/sa/b")
    new_cert = store.rotate_issuer(tmp_path, now=NOW + timedelta(days=1))
    new = store.load_issuer(tmp_path, now=NOW + timedelta(days=1))
    assert (tmp_path / store.ANCHOR_CERT).read_bytes() == anchor_pem
    assert new.cert == new_cert and new.cert.serial_number != old.cert.serial_number
    assert new.key.public_key() != old.key.public_key()
    assert _mode(tmp_path / store.ISSUER_KEY) == 0o600
    pki.check_chain([leaf, old.cert], new.anchors, NOW + timedelta(hours=1))


def test_rotate_with_anchor_key_elsewhere(tmp_path: Path) -> None:
    """With the anchor key moved offline, rotation takes --anchor-key; a wrong key is
    refused naming the file."""
    store.init(tmp_path, "example.org", now=NOW)
    offline = tmp_path / "offline.key"
    (tmp_path / store.ANCHOR_KEY).rename(offline)
    with pytest.raises(store.StoreError, match="cannot read"):
        store.rotate_issuer(tmp_path, now=NOW)
    store.rotate_issuer(tmp_path, now=NOW, anchor_key_path=offline)
    stranger = tmp_path / "stranger.key"
    store.write_private(stranger, pki.key_pem(pki.new_key()))
    with pytest.raises(store.StoreError, match="stranger.key: this key belongs to no"):
        store.rotate_issuer(tmp_path, now=NOW, anchor_key_path=stranger)


def test_load_issuer_errors(tmp_path: Path) -> None:
    """A mismatched issuer key, an expired issuer and a missing file are each named."""
    store.init(tmp_path, "example.org", now=NOW)
    with pytest.raises(store.StoreError, match="expired"):
        store.load_issuer(tmp_path, now=NOW + timedelta(days=400))
    (tmp_path / store.ISSUER_KEY).write_bytes(pki.key_pem(pki.new_key()))
    with pytest.raises(store.StoreError, match="issuer.key: this key does not match"):
        store.load_issuer(tmp_path, now=NOW)
    (tmp_path / store.ISSUER_CERT).unlink()
    with pytest.raises(store.StoreError, match="issuer.pem: cannot read"):
        store.load_issuer(tmp_path, now=NOW)


def test_inspect_healthy_dir(tmp_path: Path) -> None:
    """inspect describes both certificates, checks the chain, finds no problem, and prints
    no key material."""
    store.init(tmp_path, "example.org", now=NOW)
    report = inspection.inspect_dir(tmp_path, NOW)
    text = "\n".join(report.lines)
    assert report.problems == [] and report.warnings == []
    assert "CN=root.example.org" in text and "CN=issuer.example.org" in text
    assert "URI:spiffe://example.org" in text
    assert "chain: issuer.pem -> trust-anchor.pem ok" in text
    assert "PRIVATE" not in text


def test_inspect_finds_problems(tmp_path: Path) -> None:
    """Expiry soon is a warning; expiry, a readable key and a mismatched key are problems."""
    store.init(tmp_path, "example.org", now=NOW, issuer_lifetime=timedelta(days=10))
    soon = inspection.inspect_dir(tmp_path, NOW)
    assert soon.problems == []
    assert any("issuer.pem: expires" in w for w in soon.warnings)
    os.chmod(tmp_path / store.ISSUER_KEY, 0o644)
    (tmp_path / store.ANCHOR_KEY).write_bytes(pki.key_pem(pki.new_key()))
    late = inspection.inspect_dir(tmp_path, NOW + timedelta(days=11))
    text = "\n".join(late.problems)
    assert "issuer.pem: expired" in text
    assert "mode 0644 lets others read the key" in text
    assert "trust-anchor.key: does not match its certificate" in text


def test_cli_init_inspect_rotate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI functions: init exit 0, inspect 0, rotate 0, second init 1, bad domain 2."""
    d = str(tmp_path / "d")
    assert _run(["certs", "init", "--trust-domain", "example.org", "--dir", d]) == 0
    assert _run(["certs", "inspect", "--dir", d]) == 0
    assert "chain: issuer.pem -> trust-anchor.pem ok" in capsys.readouterr().out
    assert _run(["certs", "rotate-issuer", "--dir", d]) == 0
    assert _run(["certs", "inspect", str(Path(d) / "issuer.pem")]) == 0
    assert _run(["certs", "init", "--trust-domain", "example.org", "--dir", d]) == 1
    assert "already exist" in capsys.readouterr().err
    assert _run(["certs", "init", "--trust-domain", "Bad_Domain!", "--dir", d]) == 2
    assert "trust domain 'Bad_Domain!'" in capsys.readouterr().err
    assert _run(["certs", "init", "--trust-domain", "example.org", "--dir", d,
                 "--issuer-lifetime", "soon"]) == 2
    assert "--issuer-lifetime: bad value 'soon'" in capsys.readouterr().err
    assert _run(["certs", "inspect"]) == 2


def test_cli_inspect_exit_1_on_problem(tmp_path: Path) -> None:
    """inspect exits 1 when a file is not a certificate."""
    (tmp_path / "junk.pem").write_text("junk")
    assert _run(["certs", "inspect", str(tmp_path / "junk.pem")]) == 1


@pytest.mark.parametrize("text, seconds", [
    ("30s", 30), ("90m", 5400), ("24h", 86400), ("365d", 365 * 86400), ("1.5", 1.5),
    ("0.5h", 1800),
])
def test_parse_duration_good(text: str, seconds: float) -> None:
    """Durations with s, m, h, d or none."""
    assert cli.parse_duration("--x", text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0", "-1s", "1w", "h", "1 h", "1e3"])
def test_parse_duration_bad(text: str) -> None:
    """Bad or zero durations name the flag and the value."""
    with pytest.raises(cli.UsageError, match=f"--x: bad value {text!r}"):
        cli.parse_duration("--x", text)


@pytest.mark.parametrize("text, expected", [
    ("0.0.0.0:8080", ("0.0.0.0", 8080)), ("[::1]:0", ("::1", 0)),
    ("localhost:1", ("localhost", 1)),
])
def test_parse_hostport_good(text: str, expected: tuple[str, int]) -> None:
    """HOST:PORT and [IPv6]:PORT."""
    assert cli.parse_hostport("--listen", text) == expected


@pytest.mark.parametrize("text", ["8080", ":8080", "host:", "host:65536", "host:x"])
def test_parse_hostport_bad(text: str) -> None:
    """Malformed listen addresses name the flag."""
    with pytest.raises(cli.UsageError, match="--listen: bad value"):
        cli.parse_hostport("--listen", text)


def test_identity_flags_checked(tmp_path: Path) -> None:
    """service_from_args refuses no auth source, a bad tokens file (naming the line) and a
    bad lifetime."""
    store.init(tmp_path, "example.org", now=NOW)
    base = ["identity", "--dir", str(tmp_path), "--listen", "127.0.0.1:0"]
    with pytest.raises(cli.UsageError, match="--tokens FILE, --kube-api URL"):
        cli.service_from_args(_parse(base))
    (tmp_path / "tokens").write_text("short default web\n")
    with pytest.raises(cli.UsageError, match="tokens:1: the token is shorter"):
        cli.service_from_args(_parse([*base, "--tokens", str(tmp_path / "tokens")]))
    (tmp_path / "tokens").write_text("0123456789abcdef default web\n")
    with pytest.raises(cli.UsageError, match="--leaf-lifetime: bad value '0s'"):
        cli.service_from_args(_parse([*base, "--tokens", str(tmp_path / "tokens"),
                                      "--leaf-lifetime", "0s"]))
    svc, host, port = cli.service_from_args(_parse([*base, "--tokens",
                                                    str(tmp_path / "tokens")]))
    assert (host, port, svc.trust_domain) == ("127.0.0.1", 0, "example.org")
