"""The umbrella's values.yaml repeats common sub-chart defaults for reference: they agree."""

from __future__ import annotations

from typing import Any

import yaml

from tests.charts.chart_tools import API, CHARTS, SCHED, UMBRELLA, WEB

BLOCKS = {"gateway": API, "schedulerProxy": SCHED, "webProxy": WEB}


def _leaves(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def _values(chart: str) -> dict[str, Any]:
    return yaml.safe_load((CHARTS / chart / "values.yaml").read_text())


def test_umbrella_blocks_are_the_three_sub_charts() -> None:
    assert set(_values(UMBRELLA)) == set(BLOCKS)


def test_repeated_defaults_agree_with_the_sub_charts() -> None:
    umbrella = _values(UMBRELLA)
    for block, chart in BLOCKS.items():
        sub = _leaves(_values(chart))
        repeated = _leaves(umbrella[block])
        assert repeated.pop(("enabled",)) is True
        assert len(repeated) >= 5
        for path, value in repeated.items():
            assert path in sub, f"{block}.{'.'.join(path)} is not a value of {chart}"
            assert sub[path] == value, f"{block}.{'.'.join(path)}: {value!r} != {sub[path]!r}"
