"""The Dockerfiles (not buildable here: no Docker engine) are linted and checked for sense."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.charts.chart_tools import REPO, SCENARIOS, UMBRELLA, render, run, tool

DOCKER = REPO / "docker"
DOCKERFILES = ["gateway.Dockerfile", "cluster.Dockerfile"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_is_clean(name: str) -> None:
    result = run([tool("hadolint"), "--no-color", str(DOCKER / name)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_finds_problems() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "Dockerfile"
        bad.write_text("FROM python:latest\nRUN pip install dask\n")
        result = run([tool("hadolint"), "--no-color", str(bad)])
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout


@pytest.mark.parametrize("name", DOCKERFILES)
def test_non_root_slim_python_and_copied_files_exist(name: str) -> None:
    text = (DOCKER / name).read_text()
    assert re.findall(r"^FROM (\S+)", text, re.M)[-1] == "python:3.11-slim"
    assert re.findall(r"^USER (\S+)", text, re.M)[-1] == "1000:1000"
    assert "-c requirements/constraints.txt" in text or "constraints.txt -r" in text
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for source in sources.split():
            assert (REPO / source).exists(), f"{name}: COPY {source} does not exist"
    ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    assert "*" in ignore  # everything excluded by default ...
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for source in sources.split():  # ... but what is copied
            assert f"!{source}" in ignore, f"{source} is excluded from the build context"


def test_cluster_image_has_the_official_preload() -> None:
    requirements = (DOCKER / "cluster-requirements.txt").read_text().split()
    assert {"dask", "distributed", "dask-gateway", "bokeh"} <= set(requirements)
    pinned = {
        line.split("==")[0].lower()
        for line in (REPO / "requirements" / "constraints.txt").read_text().splitlines()
        if "==" in line
    }
    assert {"dask", "distributed", "dask-gateway", "bokeh"} <= pinned


def test_chart_commands_are_console_scripts_of_the_gateway_image() -> None:
    scripts = set()
    for pyproject in (REPO / "services").glob("*/pyproject.toml"):
        scripts |= set(re.findall(r'^([\w-]+) = "', pyproject.read_text(), re.M))
    out = render(UMBRELLA, SCENARIOS["default"])
    commands = {
        d["spec"]["template"]["spec"]["containers"][0]["command"][0]
        for d in out.of_kind("Deployment")
    }
    assert commands == {
        "dask-gateway-api",
        "dask-gateway-scheduler-proxy",
        "dask-gateway-web-proxy",
    }
    assert commands <= scripts
    gateway_image = (DOCKER / "gateway.Dockerfile").read_text()
    for service in (
        "services/api",
        "services/scheduler-proxy",
        "services/web-proxy",
        "libs/common",
    ):
        assert f"./{service}" in gateway_image


def test_images_in_values_are_the_two_images() -> None:
    images = set()
    for chart in ("dask-gateway-api", "dask-gateway-scheduler-proxy", "dask-gateway-web-proxy"):
        values = yaml.safe_load((REPO / "charts" / chart / "values.yaml").read_text())
        images.add(values["image"]["name"].rsplit("/", 1)[-1])
        if "backend" in values:
            images.add(values["backend"]["image"]["name"].rsplit("/", 1)[-1])
    assert images == {"gateway", "cluster"}
