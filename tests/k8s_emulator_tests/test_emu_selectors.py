"""Label and field selector parsing and matching (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.k8s_emulator.selectors import (
    SelectorError,
    label_key_problem,
    label_value_problem,
    parse_field_selector,
    parse_label_selector,
)

LABELS = {"app": "dask", "component": "worker", "tier": "3", "example.com/owner": "alice"}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("", True),
        ("app=dask", True),
        ("app==dask", True),
        ("app=other", False),
        ("app!=other", True),
        ("app!=dask", False),
        ("missing!=x", True),
        ("component in (worker, scheduler)", True),
        ("component in (scheduler)", False),
        ("component notin (scheduler)", True),
        ("component notin (worker,scheduler)", False),
        ("missing notin (a)", True),
        ("missing in (a)", False),
        ("app", True),
        ("missing", False),
        ("!missing", True),
        ("!app", False),
        ("tier>2", True),
        ("tier<3", False),
        ("missing>1", False),
        ("example.com/owner=alice,app=dask", True),
        ("example.com/owner=alice, app=other", False),
        ("  app = dask  ,  component  ", True),
        ("app=", False),
    ],
)
def test_label_selector_matches_like_kubernetes(selector: str, expected: bool) -> None:
    assert parse_label_selector(selector).matches(LABELS) is expected


def test_empty_value_selector_matches_empty_label() -> None:
    assert parse_label_selector("flag=").matches({"flag": ""})
    assert parse_label_selector("flag in ()").matches({"flag": ""})


def test_non_integer_label_never_satisfies_gt() -> None:
    assert not parse_label_selector("app>1").matches(LABELS)


@pytest.mark.parametrize(
    "selector",
    [
        "app=a=b",
        "app in dask",
        "app in (a",
        "=x",
        "in=x",
        "app>x",
        "app=(x)",
        "!",
        "a,,b",
        "bad key=x",
        "a b",
    ],
)
def test_malformed_label_selectors_are_rejected(selector: str) -> None:
    with pytest.raises(SelectorError):
        parse_label_selector(selector)


def test_label_syntax_checks() -> None:
    assert label_key_problem("app") is None
    assert label_key_problem("gateway.dask.org/cluster") is None
    assert label_key_problem("x" * 64) is not None
    assert label_key_problem("Upper.Example/x") is not None
    assert label_key_problem("/x") is not None
    assert label_value_problem("") is None
    assert label_value_problem("v" * 63) is None
    assert label_value_problem("v" * 64) is not None
    assert label_value_problem("-leading") is not None


label_keys = st.from_regex(r"\A[a-z][a-z0-9]{0,10}\Z")
label_values = st.from_regex(r"\A([a-z0-9]([a-z0-9.\-_]{0,8}[a-z0-9])?)?\Z")


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(label_keys, label_values, max_size=5),
    st.dictionaries(label_keys, label_values, max_size=5),
)
def test_equality_selector_built_from_labels_matches_exactly_their_supersets(
    wanted: dict[str, str], labels: dict[str, str]
) -> None:
    text = ",".join(f"{k}={v}" for k, v in wanted.items())
    expected = all(labels.get(k) == v for k, v in wanted.items())
    assert parse_label_selector(text).matches(labels) is expected
    assert parse_label_selector(text).matches({**labels, **wanted})


FIELDS = {"metadata.name": "a,b", "status.phase": "Running", "spec.nodeName": ""}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("status.phase=Running", True),
        ("status.phase==Running", True),
        ("status.phase!=Running", False),
        ("status.phase=Pending", False),
        ("spec.nodeName=", True),
        ("spec.nodeName!=", False),
        ("metadata.name=a\\,b", True),
        ("status.phase=Running,spec.nodeName=", True),
        ("metadata.namespace=", True),
    ],
)
def test_field_selector_matches(selector: str, expected: bool) -> None:
    assert parse_field_selector(selector).matches(FIELDS) is expected


@pytest.mark.parametrize("selector", ["status.phase", "=x", "a=b=c", "a=b\\x"])
def test_malformed_field_selectors_are_rejected(selector: str) -> None:
    with pytest.raises(SelectorError):
        parse_field_selector(selector)


def test_field_selector_keys() -> None:
    assert parse_field_selector("a=1,b!=2").keys == ("a", "b")
