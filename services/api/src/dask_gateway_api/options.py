"""Cluster options: field declarations, the wire spec, validation, transform (spec §6).

Theory of operation
-------------------
The operator declares option *fields* (YAML, see :func:`field_from_config`). A user sees
an :class:`OptionsSpec` (every field, or a per-group subset chosen by
:meth:`OptionsConfig.spec_for`). Creating a cluster runs three pure steps:

1. :meth:`OptionsSpec.validate` -- the request's ``cluster_options`` object becomes the
   *validated options*: every visible field, the user's value or the default. These are
   stored with the cluster and sent back on the wire as its ``options``. Failures raise
   :class:`OptionsError` with the exact messages of §6.3.
2. :meth:`OptionsSpec.transform` -- each field is renamed to its ``target`` and a Select
   key is replaced by its value.
3. :meth:`OptionsSpec.overrides_for` -- the transformed options, or (when a handler is
   configured) whatever ``handler(options, user)`` returns, are the overrides that
   :func:`~dask_gateway_api.resources.resolve_cluster_config` lays over the server
   defaults.

Two error types, by who is at fault: :class:`OptionsError` (the user's request; HTTP 422;
a ``ValueError``) and :class:`OptionsConfigError` (the operator's declarations; reported
at start-up).

YAML shape of one field (``options.fields`` is a list of these)::

    - field: worker_cores      # required; a Python identifier, unique
      type: integer            # string | bool | integer (int) | float | select | mapping
      label: Worker cores      # optional; defaults to the field name
      default: 1               # optional; else "", false, 0 (moved into min..max), first
                               # option, {}
      min: 1                   # integer / float only; optional, inclusive
      max: 4                   # integer / float only; optional, inclusive
      target: worker_cores     # optional; the override key; defaults to the field name
    - field: size
      type: select
      options:                 # select only; non-empty; a key alone or a key with a value
        - small                # key "small", value "small"
        - key: large           # key "large" ...
          value: {worker_cores: 4}   # ... transformed into this value
        - [huge, {worker_cores: 8}]  # the same, as a [key, value] pair
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Mapping as AbcMapping
from dataclasses import dataclass
from typing import Any, Protocol

from dask_gateway_common.errors import GatewayError

__all__ = [
    "Bool",
    "Field",
    "Float",
    "Handler",
    "Integer",
    "Mapping",
    "OptionsConfig",
    "OptionsConfigError",
    "OptionsError",
    "OptionsSpec",
    "OptionsView",
    "Select",
    "String",
    "field_from_config",
    "load_handler",
]

#: ``handler(options, user) -> overrides`` (a one-argument ``handler(options)`` also works).
Handler = Callable[..., AbcMapping[str, Any]]

FALLBACK_GROUP = "*"


class OptionsError(GatewayError, ValueError):
    """The user's options are invalid; the message is shown to them (HTTP 422)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=422)


class OptionsConfigError(ValueError):
    """The operator's option declarations are invalid (a configuration problem)."""


class _HasGroups(Protocol):
    @property
    def groups(self) -> Iterable[str]: ...


# --- fields -----------------------------------------------------------------------------


class Field:
    """One option field. Subclasses define the type, its checks and its wire spec."""

    type_name: str = ""  # the spec "type" on the wire

    def __init__(self, field: str, default: Any, *, label: str | None, target: str | None):
        if not isinstance(field, str) or not field.isidentifier():
            raise OptionsConfigError(f"field name must be an identifier, got {field!r}")
        if label is not None and not isinstance(label, str):
            raise OptionsConfigError(f"{field}: label must be a string, got {label!r}")
        if target is not None and (not isinstance(target, str) or not target):
            raise OptionsConfigError(f"{field}: target must be a non-empty string, got {target!r}")
        self.field = field
        self.label = label if label else field
        self.target = target if target else field
        try:
            self.default = self.validate(default)
        except OptionsError as exc:
            raise OptionsConfigError(f"invalid default: {exc}") from None

    def validate(self, value: Any) -> Any:
        """Return the validated value or raise :class:`OptionsError` (§6.3 messages)."""
        raise NotImplementedError

    def transform(self, value: Any) -> Any:
        """The value to hand on under :attr:`target` (identity except for Select)."""
        return value

    def wire_spec(self) -> dict[str, Any]:
        return {"type": self.type_name}

    def to_wire(self) -> dict[str, Any]:
        """This field's entry in the E3 reply (§6.1)."""
        return {
            "field": self.field,
            "label": self.label,
            "default": self.default,
            "spec": self.wire_spec(),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.field!r}, default={self.default!r})"


class String(Field):
    """A string."""

    type_name = "string"

    def __init__(
        self, field: str, default: str = "", *, label: str | None = None, target: str | None = None
    ) -> None:
        super().__init__(field, default, label=label, target=target)

    def validate(self, value: Any) -> str:
        if not isinstance(value, str):
            raise OptionsError(f"{self.field} must be a string, got {value!r}")
        return value


class Bool(Field):
    """A boolean."""

    type_name = "bool"

    def __init__(
        self,
        field: str,
        default: bool = False,
        *,
        label: str | None = None,
        target: str | None = None,
    ) -> None:
        super().__init__(field, default, label=label, target=target)

    def validate(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise OptionsError(f"{self.field} must be a bool, got {value!r}")
        return value


class _Number(Field):
    min: Any
    max: Any

    def _check_bounds(self, value: Any) -> Any:
        if self.min is not None and value < self.min:
            raise OptionsError(f"{self.field} must be >= {self.min:f}, got {value}")
        if self.max is not None and value > self.max:
            raise OptionsError(f"{self.field} must be <= {self.max:f}, got {value}")
        return value

    def _set_bounds(self, field: str, min: Any, max: Any, kind: Callable[[Any], bool]) -> None:
        for name, bound in (("min", min), ("max", max)):
            if bound is not None and not kind(bound):
                what = "an integer" if self.type_name == "int" else "a finite number"
                raise OptionsConfigError(f"{field}: {name} must be {what}, got {bound!r}")
        if min is not None and max is not None and min > max:
            raise OptionsConfigError(f"{field}: min ({min}) is greater than max ({max})")
        self.min = min
        self.max = max

    def wire_spec(self) -> dict[str, Any]:
        return {"type": self.type_name, "min": self.min, "max": self.max}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


class Integer(_Number):
    """An integer with optional inclusive bounds (a JSON ``true`` passes as 1, as upstream)."""

    type_name = "int"

    def __init__(
        self,
        field: str,
        default: int = 0,
        *,
        min: int | None = None,
        max: int | None = None,
        label: str | None = None,
        target: str | None = None,
    ) -> None:
        self._set_bounds(field, min, max, _is_int)
        super().__init__(field, default, label=label, target=target)

    def validate(self, value: Any) -> int:
        if not isinstance(value, int):
            raise OptionsError(f"{self.field} must be an integer, got {value!r}")
        return self._check_bounds(value)


class Float(_Number):
    """A float with optional inclusive bounds; integers are converted to float."""

    type_name = "float"

    def __init__(
        self,
        field: str,
        default: float = 0.0,
        *,
        min: float | None = None,
        max: float | None = None,
        label: str | None = None,
        target: str | None = None,
    ) -> None:
        self._set_bounds(field, min, max, _is_number)
        self.min = None if min is None else float(min)
        self.max = None if max is None else float(max)
        super().__init__(field, default, label=label, target=target)

    def validate(self, value: Any) -> float:
        if isinstance(value, int):
            value = float(value)
        if not isinstance(value, float):
            raise OptionsError(f"{self.field} must be a float, got {value!r}")
        if not math.isfinite(value):
            raise OptionsError(f"{self.field} must be a finite float, got {value!r}")
        return self._check_bounds(value)


class Select(Field):
    """One of a list of string keys; each key may carry a value used by :meth:`transform`."""

    type_name = "select"

    def __init__(
        self,
        field: str,
        options: Iterable[str | tuple[str, Any] | list[Any]],
        default: str | None = None,
        *,
        label: str | None = None,
        target: str | None = None,
    ) -> None:
        values: dict[str, Any] = {}
        if isinstance(options, str | bytes) or not isinstance(options, Iterable):
            raise OptionsConfigError(f"{field}: options must be a list, got {options!r}")
        for opt in options:
            if isinstance(opt, str):
                key, value = opt, opt
            elif isinstance(opt, tuple | list) and len(opt) == 2 and isinstance(opt[0], str):
                key, value = opt[0], opt[1]
            else:
                raise OptionsConfigError(
                    f"{field}: each option must be a string or a [key, value] pair "
                    f"with a string key, got {opt!r}"
                )
            if key in values:
                raise OptionsConfigError(f"{field}: duplicate option {key!r}")
            values[key] = value
        if not values:
            raise OptionsConfigError(f"{field}: options must not be empty")
        self.options: dict[str, Any] = values
        super().__init__(
            field, next(iter(values)) if default is None else default, label=label, target=target
        )

    def validate(self, value: Any) -> str:
        if not isinstance(value, str):
            raise OptionsError(f"{self.field} must be a string, got {value!r}")
        if value not in self.options:
            raise OptionsError(f"{value!r} is not a valid option for {self.field}")
        return value

    def transform(self, value: Any) -> Any:
        return self.options[value]

    def wire_spec(self) -> dict[str, Any]:
        return {"type": self.type_name, "options": list(self.options)}


class Mapping(Field):
    """A JSON object (e.g. extra environment variables)."""

    type_name = "mapping"

    def __init__(
        self,
        field: str,
        default: dict[str, Any] | None = None,
        *,
        label: str | None = None,
        target: str | None = None,
    ) -> None:
        super().__init__(field, {} if default is None else default, label=label, target=target)

    def validate(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise OptionsError(f"{self.field} must be a mapping, got {value!r}")
        return value


_FIELD_TYPES: dict[str, type[Field]] = {
    "string": String,
    "str": String,
    "bool": Bool,
    "boolean": Bool,
    "integer": Integer,
    "int": Integer,
    "float": Float,
    "select": Select,
    "mapping": Mapping,
    "dict": Mapping,
}
_COMMON_KEYS = {"field", "type", "label", "default", "target"}
_EXTRA_KEYS: dict[type[Field], set[str]] = {
    String: set(),
    Bool: set(),
    Integer: {"min", "max"},
    Float: {"min", "max"},
    Select: {"options"},
    Mapping: set(),
}


def _select_option(opt: Any) -> Any:
    if isinstance(opt, AbcMapping):
        if set(opt) != {"key", "value"}:
            raise OptionsConfigError(
                f"a select option given as a mapping needs exactly the keys 'key' and "
                f"'value', got {sorted(map(str, opt))!r}"
            )
        return (opt["key"], opt["value"])
    return opt


def field_from_config(config: AbcMapping[str, Any]) -> Field:
    """Build a field from its YAML declaration (shape in the module docstring).

    Raises :class:`OptionsConfigError` naming the field and the problem: unknown type,
    unknown keys, bad bounds, a default of the wrong type or outside its bounds, ...
    """
    if not isinstance(config, AbcMapping):
        raise OptionsConfigError(f"a field declaration must be a mapping, got {config!r}")
    name = config.get("field")
    if not isinstance(name, str) or not name:
        raise OptionsConfigError(f"a field declaration needs a 'field' name, got {name!r}")
    type_name = config.get("type")
    cls = _FIELD_TYPES.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise OptionsConfigError(
            f"{name}: type must be one of string, bool, integer, float, select, mapping; "
            f"got {type_name!r}"
        )
    allowed = _COMMON_KEYS | _EXTRA_KEYS[cls]
    unknown = sorted(str(k) for k in config if k not in allowed)
    if unknown:
        raise OptionsConfigError(
            f"{name}: unknown keys {unknown!r} for a {type_name} field "
            f"(allowed: {', '.join(sorted(allowed))})"
        )
    kwargs: dict[str, Any] = {"label": config.get("label"), "target": config.get("target")}
    if "default" in config:
        kwargs["default"] = config["default"]
    if cls in (Integer, Float):
        lo, hi = config.get("min"), config.get("max")
        kwargs["min"], kwargs["max"] = lo, hi
        if "default" not in config:
            # 0, moved into the bounds (so `min: 1` alone does not make an invalid default)
            default = 0
            if _is_number(lo) and default < lo:
                default = lo
            elif _is_number(hi) and default > hi:
                default = hi
            kwargs["default"] = default
    if cls is Select:
        if "options" not in config:
            raise OptionsConfigError(f"{name}: a select field needs 'options'")
        raw = config["options"]
        if not isinstance(raw, list):
            raise OptionsConfigError(f"{name}: options must be a list, got {raw!r}")
        try:
            kwargs["options"] = [_select_option(o) for o in raw]
        except OptionsConfigError as exc:
            raise OptionsConfigError(f"{name}: {exc}") from None
    try:
        return cls(name, **kwargs)
    except OptionsConfigError as exc:
        message = str(exc)
        raise OptionsConfigError(
            message if message.startswith(f"{name}:") else f"{name}: {message}"
        ) from None


# --- handler ----------------------------------------------------------------------------


class OptionsView(AbcMapping[str, Any]):
    """A read-only mapping whose keys can also be read as attributes (``options.size``)."""

    __slots__ = ("_data",)

    def __init__(self, data: AbcMapping[str, Any]) -> None:
        object.__setattr__(self, "_data", dict(data))

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._data[key]
        except KeyError:
            raise AttributeError(f"no option {key!r}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("cluster options are read-only")

    def __repr__(self) -> str:
        return f"OptionsView({self._data!r})"


def load_handler(path: str) -> Handler:
    """Import ``"module:function"``; raises :class:`OptionsConfigError` with a clear reason.

    The function must be a plain (synchronous) callable taking ``(options)`` or
    ``(options, user)`` and returning a mapping of cluster config overrides.
    """
    if not isinstance(path, str) or path.count(":") != 1:
        raise OptionsConfigError(f"handler must look like 'module:function', got {path!r}")
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise OptionsConfigError(f"handler must look like 'module:function', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an ImportError, or whatever the module raised on import
        raise OptionsConfigError(
            f"cannot import handler module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise OptionsConfigError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise OptionsConfigError(f"handler {path!r} is not callable")
    if inspect.iscoroutinefunction(obj):
        raise OptionsConfigError(f"handler {path!r} must be a plain function, not async")
    if _handler_arity(obj) is None:
        raise OptionsConfigError(
            f"handler {path!r} must accept (options) or (options, user) positional arguments"
        )
    return obj


def _handler_arity(fn: Callable[..., Any]) -> int | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 2  # builtins without a signature: assume (options, user)
    for n in (2, 1):
        try:
            sig.bind(*range(n))
        except TypeError:
            continue
        return n
    return None


# --- spec -------------------------------------------------------------------------------


class OptionsSpec:
    """The option fields one user sees, plus the optional handler."""

    def __init__(self, fields: Iterable[Field], handler: Handler | None = None) -> None:
        self.fields: tuple[Field, ...] = tuple(fields)
        names = [f.field for f in self.fields]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise OptionsConfigError(f"duplicate option fields {dupes!r}")
        self._by_name = {f.field: f for f in self.fields}
        self.handler = handler
        self._arity = _handler_arity(handler) if handler is not None else None

    def to_wire(self) -> list[dict[str, Any]]:
        """The ``cluster_options`` list of the E3 reply, in declaration order."""
        return [f.to_wire() for f in self.fields]

    def validate(self, user_options: object) -> dict[str, Any]:
        """Validate a request's options and fill in defaults (§6.3). Raises OptionsError."""
        if user_options is None:
            user_options = {}
        if not isinstance(user_options, dict):
            raise OptionsError(f"options must be a dict, got {type(user_options).__name__!r}")
        unknown = [k for k in user_options if k not in self._by_name]
        if unknown:
            raise OptionsError(f"Unknown fields {sorted(unknown, key=str)!r}")
        return {f.field: f.validate(user_options.get(f.field, f.default)) for f in self.fields}

    def transform(self, validated: AbcMapping[str, Any]) -> dict[str, Any]:
        """Rename validated options to their targets, Select keys to their values."""
        return {
            self._by_name[name].target: self._by_name[name].transform(value)
            for name, value in validated.items()
        }

    def overrides_for(self, validated: AbcMapping[str, Any], user: object) -> dict[str, Any]:
        """The cluster config overrides for these validated options and this user.

        Without a handler: the transformed options. With one: ``handler(OptionsView(
        transformed), user)`` (or ``handler(view)``). Any exception the handler raises
        becomes :class:`OptionsError` with its message; a result that is not a mapping
        with string keys is the operator's bug: a 500 :class:`GatewayError`.
        """
        transformed = self.transform(validated)
        if self.handler is None:
            return transformed
        view = OptionsView(transformed)
        try:
            if self._arity == 1:
                result = self.handler(view)
            else:
                result = self.handler(view, user)
        except Exception as exc:
            raise OptionsError(str(exc) or type(exc).__name__) from exc
        if not isinstance(result, AbcMapping) or not all(isinstance(k, str) for k in result):
            raise GatewayError(
                "The cluster options handler returned an invalid result; "
                "ask the gateway's operator to fix it",
                status=500,
            )
        return dict(result)


@dataclass(frozen=True)
class OptionsConfig:
    """Every declared field, the per-group visibility rule and the handler.

    Rule of :meth:`spec_for`: with no ``groups`` configured, every user sees every field.
    Otherwise a user sees the union of the fields listed for the groups they belong to,
    in declaration order. A user in none of the listed groups sees the fields of the
    fallback group ``"*"`` if one is configured, else every field.
    """

    fields: tuple[Field, ...] = ()
    groups: AbcMapping[str, tuple[str, ...]] | None = None
    handler: Handler | None = None

    def __post_init__(self) -> None:
        known = {f.field for f in self.fields}
        OptionsSpec(self.fields)  # duplicate names are a config error
        for group, names in (self.groups or {}).items():
            missing = sorted(set(names) - known)
            if missing:
                raise OptionsConfigError(f"group {group!r} lists unknown fields {missing!r}")

    @property
    def spec(self) -> OptionsSpec:
        """The spec with every field."""
        return OptionsSpec(self.fields, self.handler)

    def visible_fields(self, groups: Iterable[str]) -> tuple[Field, ...]:
        if not self.groups:
            return self.fields
        mine = set(groups) & (set(self.groups) - {FALLBACK_GROUP})
        if not mine:
            if FALLBACK_GROUP not in self.groups:
                return self.fields
            mine = {FALLBACK_GROUP}
        wanted = {name for g in mine for name in self.groups[g]}
        return tuple(f for f in self.fields if f.field in wanted)

    def spec_for(self, user: _HasGroups) -> OptionsSpec:
        """The spec this user sees (see the class docstring for the rule)."""
        return OptionsSpec(self.visible_fields(getattr(user, "groups", ()) or ()), self.handler)
