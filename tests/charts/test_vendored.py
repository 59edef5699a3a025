"""The umbrella's vendored sub-charts (charts/dask-gateway/charts/*.tgz) match the sources.

They are committed so that `helm install ./charts/dask-gateway` works from a clean clone;
this test catches a sub-chart edited without `helm dependency update charts/dask-gateway`.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import yaml

from tests.charts.chart_tools import API, CHARTS, SCHED, UMBRELLA, WEB, helm

FIX = "run `.venv/bin/helm dependency update charts/dask-gateway` and commit the result"


def _declared() -> list[dict]:
    return yaml.safe_load((CHARTS / UMBRELLA / "Chart.yaml").read_text())["dependencies"]


def _source_files(chart_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(chart_dir.parent)): p.read_bytes()
        for p in sorted(chart_dir.rglob("*"))
        if p.is_file()
    }


def test_dependencies_are_the_three_local_charts() -> None:
    deps = {d["name"]: d for d in _declared()}
    assert set(deps) == {API, SCHED, WEB}
    assert {d["alias"] for d in deps.values()} == {"gateway", "schedulerProxy", "webProxy"}
    for name, dep in deps.items():
        assert dep["repository"] == f"file://../{name}"
        version = yaml.safe_load((CHARTS / name / "Chart.yaml").read_text())["version"]
        assert dep["version"] == version


def test_lock_matches_chart_yaml() -> None:
    lock = yaml.safe_load((CHARTS / UMBRELLA / "Chart.lock").read_text())
    locked = {(d["name"], d["version"], d["repository"]) for d in lock["dependencies"]}
    declared = {(d["name"], d["version"], d["repository"]) for d in _declared()}
    assert locked == declared, FIX
    result = helm("dependency", "list", str(CHARTS / UMBRELLA))
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:] if line.strip()]
    assert len(rows) == 3 and all(row[-1] == "ok" for row in rows), result.stdout


@pytest.mark.parametrize("name", [API, SCHED, WEB])
def test_vendored_chart_matches_its_source(name: str) -> None:
    version = yaml.safe_load((CHARTS / name / "Chart.yaml").read_text())["version"]
    archive = CHARTS / UMBRELLA / "charts" / f"{name}-{version}.tgz"
    assert archive.is_file(), f"{archive} is missing: {FIX}"
    with tarfile.open(archive) as tar:
        packed = {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }
    source = _source_files(CHARTS / name)
    assert set(packed) == set(source), FIX
    for path, data in source.items():
        if path.endswith("/Chart.yaml"):  # Helm re-serialises it when packaging
            assert yaml.safe_load(packed[path]) == yaml.safe_load(data), f"{path}: {FIX}"
        else:
            assert packed[path] == data, f"{path} differs from the vendored copy: {FIX}"


def test_no_stray_vendored_files() -> None:
    vendored = sorted(p.name for p in (CHARTS / UMBRELLA / "charts").iterdir())
    expected = sorted(f"{d['name']}-{d['version']}.tgz" for d in _declared())
    assert vendored == expected, FIX
