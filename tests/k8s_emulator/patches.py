"""The three PATCH flavours of the Kubernetes API, applied to plain JSON values (pure).

* ``application/merge-patch+json``: RFC 7386 (objects merge, ``null`` deletes, anything
  else replaces).
* ``application/strategic-merge-patch+json``: the merge patch above, except that lists of
  objects the real API server merges by key (``containers`` by ``name``, ``ownerReferences``
  by ``uid``, ``conditions`` by ``type``, ...; see :data:`MERGE_KEYS`) are merged item by item,
  an item ``{"<key>": ..., "$patch": "delete"}`` removes one, and ``finalizers`` is merged as
  a set. Other directives (``$retainKeys``, ``$setElementOrder``, ``$deleteFromPrimitiveList``)
  are not emulated; a list without a known merge key is replaced, as for merge patch.
* ``application/json-patch+json``: RFC 6902 (add, remove, replace, move, copy, test).

Failures raise :class:`PatchError`, which the server turns into 422 ``Invalid`` (a failed
``test`` or a bad path) or 400 ``BadRequest`` (a malformed patch document).
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = [
    "MERGE_KEYS",
    "PatchError",
    "apply_json_patch",
    "apply_merge_patch",
    "apply_strategic_merge_patch",
]

#: field name -> merge key for lists of objects that core/v1 strategic merge merges by key.
MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "ownerReferences": "uid",
    "conditions": "type",
    "containerStatuses": "name",
    "initContainerStatuses": "name",
    "hostAliases": "ip",
}
#: lists of scalars merged as sets (patchStrategy "merge").
SET_FIELDS = frozenset({"finalizers"})


class PatchError(ValueError):
    """A patch that cannot be applied; ``status`` is 400 (malformed) or 422 (does not apply)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; returns a new value."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


def apply_strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge patch, simplified as described in the module docstring."""
    if not isinstance(patch, dict):
        raise PatchError("strategic merge patch must be a JSON object", status=400)
    return _strategic(target, patch, field=None)


def _strategic(target: Any, patch: Any, field: str | None) -> Any:
    if isinstance(patch, dict):
        if patch.get("$patch") == "replace":
            return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
        result = copy.deepcopy(target) if isinstance(target, dict) else {}
        for key, value in patch.items():
            if key.startswith("$"):
                continue
            if value is None:
                result.pop(key, None)
            else:
                result[key] = _strategic(result.get(key), value, field=key)
        return result
    if isinstance(patch, list) and field in SET_FIELDS and isinstance(target, list):
        merged = list(target)
        merged.extend(item for item in patch if item not in merged)
        return merged
    if isinstance(patch, list) and field in MERGE_KEYS and isinstance(target, list):
        return _merge_keyed_list(target, patch, MERGE_KEYS[field])
    if isinstance(patch, list):
        return [_strip_directives(item) for item in patch]
    return copy.deepcopy(patch)


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


def _merge_keyed_list(target: list[Any], patch: list[Any], key: str) -> list[Any]:
    result = copy.deepcopy(target)
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise PatchError(f"strategic merge patch: list item without merge key {key!r}")
        index = next(
            (
                i
                for i, have in enumerate(result)
                if isinstance(have, dict) and have.get(key) == item[key]
            ),
            None,
        )
        if item.get("$patch") == "delete":
            if index is not None:
                del result[index]
            continue
        if index is None:
            result.append(_strip_directives(item))
        else:
            result[index] = _strategic(result[index], item, field=None)
    return result


def _parse_pointer(pointer: Any) -> list[str]:
    if not isinstance(pointer, str) or (pointer and not pointer.startswith("/")):
        raise PatchError(f"json patch: invalid path {pointer!r}", status=400)
    if pointer == "":
        return []
    return [part.replace("~1", "/").replace("~0", "~") for part in pointer[1:].split("/")]


def _list_index(container: list[Any], token: str, *, allow_end: bool) -> int:
    if token == "-" and allow_end:
        return len(container)
    if not token.isdigit() or (token != "0" and token.startswith("0")):
        raise PatchError(f"json patch: invalid list index {token!r}")
    index = int(token)
    limit = len(container) if allow_end else len(container) - 1
    if index > limit:
        raise PatchError(f"json patch: list index {index} out of range")
    return index


def _resolve_parent(doc: Any, parts: list[str]) -> Any:
    node = doc
    for token in parts[:-1]:
        if isinstance(node, dict):
            if token not in node:
                raise PatchError(f"json patch: path element {token!r} not found")
            node = node[token]
        elif isinstance(node, list):
            node = node[_list_index(node, token, allow_end=False)]
        else:
            raise PatchError(f"json patch: cannot descend into a scalar at {token!r}")
    return node


def _get(doc: Any, parts: list[str]) -> Any:
    if not parts:
        return doc
    parent = _resolve_parent(doc, parts)
    last = parts[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"json patch: path element {last!r} not found")
        return parent[last]
    if isinstance(parent, list):
        return parent[_list_index(parent, last, allow_end=False)]
    raise PatchError("json patch: cannot index a scalar")


def _add(doc: Any, parts: list[str], value: Any) -> Any:
    if not parts:
        return value
    parent = _resolve_parent(doc, parts)
    last = parts[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_list_index(parent, last, allow_end=True), value)
    else:
        raise PatchError("json patch: cannot add to a scalar")
    return doc


def _remove(doc: Any, parts: list[str]) -> Any:
    if not parts:
        raise PatchError("json patch: cannot remove the whole document")
    parent = _resolve_parent(doc, parts)
    last = parts[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"json patch: path element {last!r} not found")
        del parent[last]
    elif isinstance(parent, list):
        del parent[_list_index(parent, last, allow_end=False)]
    else:
        raise PatchError("json patch: cannot remove from a scalar")
    return doc


def apply_json_patch(target: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch; returns a new value."""
    if not isinstance(operations, list):
        raise PatchError("json patch must be a JSON array of operations", status=400)
    doc = copy.deepcopy(target)
    for op in operations:
        if not isinstance(op, dict) or not isinstance(op.get("op"), str):
            raise PatchError(f"json patch: malformed operation {op!r}", status=400)
        kind = op["op"]
        path = _parse_pointer(op.get("path"))
        if kind in ("add", "replace", "test") and "value" not in op:
            raise PatchError(f"json patch: {kind} operation needs a value", status=400)
        if kind == "add":
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind == "remove":
            doc = _remove(doc, path)
        elif kind == "replace":
            _get(doc, path)
            doc = (
                _add(_remove(doc, path), path, copy.deepcopy(op["value"])) if path else op["value"]
            )
        elif kind in ("move", "copy"):
            source = _parse_pointer(op.get("from"))
            value = copy.deepcopy(_get(doc, source))
            if kind == "move":
                if path[: len(source)] == source and path != source:
                    raise PatchError("json patch: cannot move a value into itself")
                doc = _remove(doc, source)
            doc = _add(doc, path, value)
        elif kind == "test":
            if _get(doc, path) != op["value"]:
                raise PatchError(f"json patch: test operation failed at {op.get('path')!r}")
        else:
            raise PatchError(f"json patch: unknown operation {kind!r}", status=400)
    return doc
