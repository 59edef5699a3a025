"""`helm lint --strict` on every chart; `kubernetes-validate --strict` on every rendering."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import yaml

from tests.charts.chart_tools import (
    ALL_CHARTS,
    API,
    CHARTS,
    K8S_VERSION,
    SCENARIOS,
    STANDALONE,
    TOKEN,
    UMBRELLA,
    helm,
    merge,
    render,
    run,
    tool,
)

#: What each chart needs to render at all (the token is required by design).
LINT_VALUES = {
    UMBRELLA: ["--set", f"gateway.proxyToken={TOKEN}"],
    API: ["--set", f"proxyToken={TOKEN}"],
}


@pytest.mark.parametrize("chart", ALL_CHARTS)
def test_helm_lint_strict(chart: str) -> None:
    result = helm("lint", "--strict", str(CHARTS / chart), *LINT_VALUES.get(chart, []))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


def test_helm_lint_names_the_missing_token() -> None:
    # helm lint renders `required` leniently (an INFO line), so the chart still lints ...
    result = helm("lint", "--strict", str(CHARTS / UMBRELLA))
    assert result.returncode == 0, result.stdout + result.stderr
    # ... but says what is missing; `helm install`/`template` fail (test_render.py).
    assert "Missing required value: proxyToken is required" in result.stderr
    assert "gateway.proxyToken" in result.stderr


def test_helm_lint_strict_with_every_option() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        values = Path(tmp) / "full.yaml"
        values.write_text(yaml.safe_dump(SCENARIOS["full"]))
        result = helm("lint", "--strict", str(CHARTS / UMBRELLA), "-f", str(values))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


def _renderings() -> dict[str, str]:
    texts = {name: render(UMBRELLA, values).text for name, values in SCENARIOS.items()}
    for name, (chart, values) in STANDALONE.items():
        texts[name] = render(chart, values, release="gw-part").text
    return texts


def test_every_rendering_validates_against_kubernetes_schemas() -> None:
    texts = _renderings()
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for name, text in texts.items():
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(text)
            files.append(str(path))
        result = run([tool("kubernetes-validate"), "--strict", "-k", K8S_VERSION, *files])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "ERROR" not in output, output
    # One "passed" line per object, so nothing was silently left out.
    expected = sum(text.count("\nkind: ") for text in texts.values())
    assert output.count(" passed for resource ") == expected, output


def test_the_validator_rejects_a_bad_manifest() -> None:
    # The same call on a subtly wrong rendered object fails: the check above has teeth.
    service = render(UMBRELLA, SCENARIOS["default"]).get("Service", "web-public-gw")
    bad = merge(service, {"spec": {"bogusField": 1}})
    with tempfile.TemporaryDirectory() as tmp:
        good_path, bad_path = Path(tmp) / "good.yaml", Path(tmp) / "bad.yaml"
        good_path.write_text(yaml.safe_dump(service))
        bad_path.write_text(yaml.safe_dump(bad))
        result = run(
            [
                tool("kubernetes-validate"),
                "--strict",
                "-k",
                K8S_VERSION,
                str(good_path),
                str(bad_path),
            ]
        )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "good.yaml passed" in output
    assert "bad.yaml did not validate" in output and "bogusField" in output
