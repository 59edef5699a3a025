"""Merge, strategic-merge and JSON patches (pure)."""

from __future__ import annotations

import pytest

from tests.k8s_emulator.patches import (
    PatchError,
    apply_json_patch,
    apply_merge_patch,
    apply_strategic_merge_patch,
)

POD = {
    "metadata": {"name": "p", "labels": {"a": "1", "b": "2"}, "finalizers": ["x/one"]},
    "spec": {
        "containers": [
            {"name": "main", "image": "img:1", "env": [{"name": "A", "value": "1"}]},
            {"name": "side", "image": "img:2"},
        ]
    },
}


def test_merge_patch_rfc7386() -> None:
    out = apply_merge_patch(
        POD, {"metadata": {"labels": {"a": None, "c": "3"}}, "spec": {"containers": []}}
    )
    assert out["metadata"]["labels"] == {"b": "2", "c": "3"}
    assert out["spec"]["containers"] == []
    assert POD["metadata"]["labels"] == {"a": "1", "b": "2"}  # input untouched
    assert apply_merge_patch({"a": 1}, [1, 2]) == [1, 2]


def test_strategic_merge_merges_keyed_lists_and_sets() -> None:
    patch = {
        "metadata": {"finalizers": ["x/two"]},
        "spec": {
            "containers": [
                {"name": "main", "image": "img:9", "env": [{"name": "B", "value": "2"}]},
                {"name": "side", "$patch": "delete"},
                {"name": "new", "image": "img:3"},
            ]
        },
    }
    out = apply_strategic_merge_patch(POD, patch)
    assert out["metadata"]["finalizers"] == ["x/one", "x/two"]
    names = [c["name"] for c in out["spec"]["containers"]]
    assert names == ["main", "new"]
    main = out["spec"]["containers"][0]
    assert main["image"] == "img:9"
    assert main["env"] == [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]


def test_strategic_merge_replaces_unkeyed_lists_and_rejects_non_objects() -> None:
    out = apply_strategic_merge_patch({"spec": {"args": ["a", "b"]}}, {"spec": {"args": ["c"]}})
    assert out["spec"]["args"] == ["c"]
    with pytest.raises(PatchError):
        apply_strategic_merge_patch(POD, [1])


def test_json_patch_operations() -> None:
    ops = [
        {"op": "add", "path": "/metadata/labels/c", "value": "3"},
        {"op": "remove", "path": "/metadata/labels/a"},
        {"op": "replace", "path": "/spec/containers/0/image", "value": "img:5"},
        {"op": "copy", "from": "/metadata/labels/b", "path": "/metadata/labels/d"},
        {"op": "move", "from": "/metadata/labels/d", "path": "/metadata/labels/e"},
        {"op": "add", "path": "/spec/containers/-", "value": {"name": "z", "image": "i"}},
        {"op": "test", "path": "/metadata/name", "value": "p"},
        {"op": "add", "path": "/metadata/annotations", "value": {"a~b/c": "1"}},
        {"op": "replace", "path": "/metadata/annotations/a~0b~1c", "value": "2"},
    ]
    out = apply_json_patch(POD, ops)
    assert out["metadata"]["labels"] == {"b": "2", "c": "3", "e": "2"}
    assert out["spec"]["containers"][0]["image"] == "img:5"
    assert out["spec"]["containers"][-1]["name"] == "z"
    assert out["metadata"]["annotations"] == {"a~b/c": "2"}


@pytest.mark.parametrize(
    ("ops", "status"),
    [
        ([{"op": "test", "path": "/metadata/name", "value": "q"}], 422),
        ([{"op": "remove", "path": "/metadata/missing"}], 422),
        ([{"op": "replace", "path": "/spec/containers/9/image", "value": "x"}], 422),
        ([{"op": "add", "path": "no-slash", "value": 1}], 400),
        ([{"op": "frobnicate", "path": "/a"}], 400),
        ([{"path": "/a"}], 400),
        ({"op": "add"}, 400),
        ([{"op": "add", "path": "/a"}], 400),
    ],
)
def test_json_patch_failures(ops: object, status: int) -> None:
    with pytest.raises(PatchError) as info:
        apply_json_patch(POD, ops)
    assert info.value.status == status
