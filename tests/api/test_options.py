"""Option fields: declarations, wire spec (§6.1), validation messages (§6.3), transform,
handler and per-group option sets."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from dask_gateway.options import Options as ClientOptions

from dask_gateway_api.options import (
    Bool,
    Float,
    Integer,
    Mapping,
    OptionsConfig,
    OptionsConfigError,
    OptionsError,
    OptionsSpec,
    OptionsView,
    Select,
    String,
    field_from_config,
    load_handler,
)
from dask_gateway_common.errors import GatewayError


@dataclass
class User:
    name: str = "alice"
    groups: set[str] = field(default_factory=set)


def spec_example() -> OptionsSpec:
    return OptionsSpec(
        [
            Integer("worker_cores", 1, min=1, max=4, label="Worker cores"),
            Float("worker_memory", 2, min=1, max=8.5),
            Select("size", ["small", ("large", {"worker_cores": 4})]),
            String("image", "img:1"),
            Bool("gpu"),
            Mapping("environment", {"A": "1"}, target="env"),
        ]
    )


# --- wire spec --------------------------------------------------------------------------


def test_to_wire_exact() -> None:
    assert spec_example().to_wire() == [
        {
            "field": "worker_cores",
            "label": "Worker cores",
            "default": 1,
            "spec": {"type": "int", "min": 1, "max": 4},
        },
        {
            "field": "worker_memory",
            "label": "worker_memory",
            "default": 2.0,
            "spec": {"type": "float", "min": 1.0, "max": 8.5},
        },
        {
            "field": "size",
            "label": "size",
            "default": "small",
            "spec": {"type": "select", "options": ["small", "large"]},
        },
        {"field": "image", "label": "image", "default": "img:1", "spec": {"type": "string"}},
        {"field": "gpu", "label": "gpu", "default": False, "spec": {"type": "bool"}},
        {
            "field": "environment",
            "label": "environment",
            "default": {"A": "1"},
            "spec": {"type": "mapping"},
        },
    ]


def test_type_defaults_and_unbounded_numbers_on_the_wire() -> None:
    wire = OptionsSpec(
        [String("s"), Bool("b"), Integer("i"), Float("f"), Select("x", ["a", "b"]), Mapping("m")]
    ).to_wire()
    assert [w["default"] for w in wire] == ["", False, 0, 0.0, "a", {}]
    assert wire[2]["spec"] == {"type": "int", "min": None, "max": None}
    assert wire[3]["spec"] == {"type": "float", "min": None, "max": None}


def test_official_client_accepts_the_wire_spec() -> None:
    """The real client builds its Options from our JSON (round-tripped through JSON)."""
    wire = json.loads(json.dumps({"cluster_options": spec_example().to_wire()}))
    opts = ClientOptions._from_spec(wire["cluster_options"])
    assert list(opts) == ["worker_cores", "worker_memory", "size", "image", "gpu", "environment"]
    assert opts.worker_cores == 1 and opts.size == "small" and opts.worker_memory == 2.0
    with pytest.raises(ValueError, match="worker_cores must be <= 4.000000, got 5"):
        opts.worker_cores = 5
    with pytest.raises(ValueError, match="'x' is not a valid option for size"):
        opts.size = "x"
    # ... and what the client then submits, our server accepts.
    opts.worker_cores = 3
    assert spec_example().validate(dict(opts))["worker_cores"] == 3


# --- validation messages (§6.3) ---------------------------------------------------------


def test_validate_fills_defaults_in_declaration_order() -> None:
    out = spec_example().validate({"size": "large"})
    assert out == {
        "worker_cores": 1,
        "worker_memory": 2.0,
        "size": "large",
        "image": "img:1",
        "gpu": False,
        "environment": {"A": "1"},
    }
    assert list(out) == [f.field for f in spec_example().fields]


def test_null_options_mean_empty() -> None:
    assert spec_example().validate(None)["worker_cores"] == 1


@pytest.mark.parametrize(
    "options, message",
    [
        ([], "options must be a dict, got 'list'"),
        ("x", "options must be a dict, got 'str'"),
        (10, "options must be a dict, got 'int'"),
        ({"b": 1, "a": 2}, "Unknown fields ['a', 'b']"),
        ({"worker_cores": 2, "zzz": 1}, "Unknown fields ['zzz']"),
        ({"worker_cores": "2"}, "worker_cores must be an integer, got '2'"),
        ({"worker_cores": 2.0}, "worker_cores must be an integer, got 2.0"),
        ({"worker_cores": None}, "worker_cores must be an integer, got None"),
        ({"worker_cores": 0}, "worker_cores must be >= 1.000000, got 0"),
        ({"worker_cores": 5}, "worker_cores must be <= 4.000000, got 5"),
        ({"worker_memory": "x"}, "worker_memory must be a float, got 'x'"),
        ({"worker_memory": 0.5}, "worker_memory must be >= 1.000000, got 0.5"),
        ({"worker_memory": 9}, "worker_memory must be <= 8.500000, got 9.0"),
        ({"worker_memory": float("nan")}, "worker_memory must be a finite float, got nan"),
        ({"size": "x"}, "'x' is not a valid option for size"),
        ({"size": 1}, "size must be a string, got 1"),
        ({"image": 3}, "image must be a string, got 3"),
        ({"gpu": 1}, "gpu must be a bool, got 1"),
        ({"gpu": "true"}, "gpu must be a bool, got 'true'"),
        ({"environment": []}, "environment must be a mapping, got []"),
        ({"environment": "A=1"}, "environment must be a mapping, got 'A=1'"),
    ],
)
def test_validation_messages(options: object, message: str) -> None:
    with pytest.raises(OptionsError) as info:
        spec_example().validate(options)
    assert str(info.value) == message
    assert info.value.message == message
    assert info.value.status == 422
    assert isinstance(info.value, ValueError) and isinstance(info.value, GatewayError)


def test_bool_passes_as_integer_and_int_as_float() -> None:
    out = spec_example().validate({"worker_cores": True, "worker_memory": 3})
    assert out["worker_cores"] is True
    assert out["worker_memory"] == 3.0 and isinstance(out["worker_memory"], float)


def test_bounds_inclusive() -> None:
    spec = spec_example()
    assert spec.validate({"worker_cores": 4})["worker_cores"] == 4
    assert spec.validate({"worker_cores": 1})["worker_cores"] == 1
    assert spec.validate({"worker_memory": 8.5})["worker_memory"] == 8.5


def test_unknown_field_names_that_are_not_strings_sort() -> None:
    # JSON keys are strings, but Python callers may pass anything: no TypeError from sort.
    with pytest.raises(OptionsError, match="Unknown fields"):
        spec_example().validate({1: "a", "b": 2})


# --- transform and handler --------------------------------------------------------------


def test_transform_renames_and_substitutes_select_values() -> None:
    spec = spec_example()
    out = spec.transform(spec.validate({"size": "large"}))
    assert out["size"] == {"worker_cores": 4}
    assert out["env"] == {"A": "1"}
    assert "environment" not in out
    assert spec.transform(spec.validate({}))["size"] == "small"


def test_overrides_without_handler_are_the_transformed_options() -> None:
    spec = OptionsSpec([Integer("cores", 1, target="worker_cores")])
    assert spec.overrides_for(spec.validate({"cores": 3}), User()) == {"worker_cores": 3}


def test_handler_with_user() -> None:
    seen: list[Any] = []

    def handler(options: OptionsView, user: User) -> dict[str, Any]:
        seen.append((dict(options), options.size, user.name))
        return {"worker_cores": options.size["worker_cores"] + 1}

    spec = OptionsSpec([Select("size", [("large", {"worker_cores": 4})])], handler)
    assert spec.overrides_for(spec.validate({}), User("bob")) == {"worker_cores": 5}
    assert seen == [({"size": {"worker_cores": 4}}, {"worker_cores": 4}, "bob")]


def test_handler_with_options_only() -> None:
    spec = OptionsSpec([Integer("n", 2)], lambda options: {"worker_cores": options["n"]})
    assert spec.overrides_for(spec.validate({}), User()) == {"worker_cores": 2}


def test_handler_sees_a_read_only_view() -> None:
    def handler(options: OptionsView, user: User) -> dict[str, Any]:
        with pytest.raises(AttributeError, match="read-only"):
            options.n = 3  # type: ignore[misc]
        with pytest.raises(TypeError):
            options["n"] = 3  # type: ignore[index]
        with pytest.raises(AttributeError, match="no option 'missing'"):
            options.missing  # noqa: B018
        return {}

    spec = OptionsSpec([Integer("n", 2)], handler)
    assert spec.overrides_for(spec.validate({}), User()) == {}


@pytest.mark.parametrize(
    "exc, message",
    [
        (ValueError("worker_cores too big for group"), "worker_cores too big for group"),
        (KeyError("x"), "'x'"),
        (RuntimeError(), "RuntimeError"),
    ],
)
def test_handler_errors_become_options_errors(exc: Exception, message: str) -> None:
    def handler(options: OptionsView, user: User) -> dict[str, Any]:
        raise exc

    spec = OptionsSpec([Integer("n", 2)], handler)
    with pytest.raises(OptionsError) as info:
        spec.overrides_for(spec.validate({}), User())
    assert str(info.value) == message
    assert info.value.status == 422


@pytest.mark.parametrize("result", [None, [1, 2], {1: "x"}, "worker_cores"])
def test_handler_returning_garbage_is_a_server_error(result: object) -> None:
    spec = OptionsSpec([Integer("n", 2)], lambda options, user: result)
    with pytest.raises(GatewayError) as info:
        spec.overrides_for(spec.validate({}), User())
    assert info.value.status == 500
    assert not isinstance(info.value, OptionsError)


@pytest.fixture
def handler_module() -> Iterator[str]:
    mod = types.ModuleType("gw_test_handlers")

    def two(options: Any, user: Any) -> dict[str, Any]:
        return {"worker_cores": 2}

    def one(options: Any) -> dict[str, Any]:
        return {"worker_cores": 1}

    async def async_handler(options: Any, user: Any) -> dict[str, Any]:
        return {}

    def three(a: Any, b: Any, c: Any) -> dict[str, Any]:
        return {}

    class Holder:
        @staticmethod
        def nested(options: Any, user: Any) -> dict[str, Any]:
            return {"worker_cores": 9}

    mod.two, mod.one, mod.async_handler, mod.three = two, one, async_handler, three
    mod.Holder = Holder
    mod.not_callable = 5
    sys.modules[mod.__name__] = mod
    try:
        yield mod.__name__
    finally:
        del sys.modules[mod.__name__]


def test_load_handler(handler_module: str) -> None:
    assert load_handler(f"{handler_module}:two")(None, None) == {"worker_cores": 2}
    assert load_handler(f"{handler_module}:Holder.nested")(None, None) == {"worker_cores": 9}
    spec = OptionsSpec([], load_handler(f"{handler_module}:one"))
    assert spec.overrides_for({}, User()) == {"worker_cores": 1}


@pytest.mark.parametrize(
    "path, fragment",
    [
        ("no_colon", "must look like 'module:function'"),
        (":f", "must look like 'module:function'"),
        ("a:b:c", "must look like 'module:function'"),
        ("definitely_not_a_module_xyz:f", "cannot import handler module"),
        ("{mod}:missing", "has no attribute 'missing'"),
        ("{mod}:not_callable", "is not callable"),
        ("{mod}:async_handler", "must be a plain function, not async"),
        ("{mod}:three", "must accept (options) or (options, user)"),
    ],
)
def test_load_handler_errors(handler_module: str, path: str, fragment: str) -> None:
    with pytest.raises(OptionsConfigError) as info:
        load_handler(path.format(mod=handler_module))
    assert fragment in str(info.value)


# --- declarations -----------------------------------------------------------------------


def test_field_from_config_all_types() -> None:
    fields = [
        field_from_config(d)
        for d in [
            {"field": "a", "type": "string", "default": "x", "label": "A", "target": "image"},
            {"field": "b", "type": "bool", "default": True},
            {"field": "c", "type": "integer", "default": 2, "min": 1, "max": 4},
            {"field": "d", "type": "int"},
            {"field": "e", "type": "float", "min": 0.5, "max": 2},
            {
                "field": "f",
                "type": "select",
                "default": "large",
                "options": [
                    "small",
                    {"key": "large", "value": {"worker_cores": 4}},
                    ["huge", {"worker_cores": 8}],
                ],
            },
            {"field": "g", "type": "mapping", "default": {"K": "v"}},
        ]
    ]
    assert [type(f) for f in fields] == [String, Bool, Integer, Integer, Float, Select, Mapping]
    a, b, c, d, e, f, g = fields
    assert (a.label, a.target, a.default) == ("A", "image", "x")
    assert b.default is True
    assert (c.min, c.max, c.default) == (1, 4, 2)
    assert d.default == 0
    assert (e.min, e.max, e.default) == (0.5, 2.0, 0.5)
    assert f.options == {
        "small": "small",
        "large": {"worker_cores": 4},
        "huge": {"worker_cores": 8},
    }
    assert f.default == "large"
    assert g.default == {"K": "v"}


@pytest.mark.parametrize(
    "decl, fragment",
    [
        ("worker_cores", "must be a mapping"),
        ({"type": "integer"}, "needs a 'field' name"),
        ({"field": "x", "type": "number"}, "x: type must be one of"),
        ({"field": "x"}, "x: type must be one of"),
        ({"field": "x", "type": "integer", "mn": 1}, "x: unknown keys ['mn']"),
        ({"field": "x", "type": "string", "min": 1}, "x: unknown keys ['min']"),
        ({"field": "x", "type": "integer", "min": 1.5}, "x: min must be an integer, got 1.5"),
        ({"field": "x", "type": "integer", "max": True}, "x: max must be an integer, got True"),
        ({"field": "x", "type": "integer", "min": 3, "max": 2, "default": 3}, "min (3) is greater"),
        (
            {"field": "x", "type": "integer", "min": 1, "default": 0},
            "invalid default: x must be >= 1.000000, got 0",
        ),
        (
            {"field": "x", "type": "float", "max": -1, "default": 0},
            "invalid default: x must be <= -1.000000",
        ),
        (
            {"field": "x", "type": "integer", "default": "1"},
            "invalid default: x must be an integer",
        ),
        ({"field": "x", "type": "bool", "default": "yes"}, "invalid default: x must be a bool"),
        ({"field": "x", "type": "mapping", "default": []}, "invalid default: x must be a mapping"),
        ({"field": "x", "type": "float", "min": "0"}, "x: min must be a finite number, got '0'"),
        ({"field": "x", "type": "select"}, "x: a select field needs 'options'"),
        ({"field": "x", "type": "select", "options": []}, "x: options must not be empty"),
        ({"field": "x", "type": "select", "options": "a"}, "x: options must be a list"),
        ({"field": "x", "type": "select", "options": ["a", "a"]}, "duplicate option 'a'"),
        ({"field": "x", "type": "select", "options": [1]}, "each option must be a string"),
        ({"field": "x", "type": "select", "options": [{"key": "a"}]}, "exactly the keys"),
        (
            {"field": "x", "type": "select", "options": ["a"], "default": "b"},
            "invalid default: 'b' is not a valid option for x",
        ),
        ({"field": "not valid", "type": "string"}, "field name must be an identifier"),
        ({"field": "x", "type": "string", "label": 3}, "label must be a string"),
        ({"field": "x", "type": "string", "target": ""}, "target must be a non-empty string"),
    ],
)
def test_bad_declarations(decl: Any, fragment: str) -> None:
    with pytest.raises(OptionsConfigError) as info:
        field_from_config(decl)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "bounds, default",
    [
        ({}, 0),
        ({"min": 1}, 1),
        ({"max": -2}, -2),
        ({"min": -5, "max": 5}, 0),
        ({"min": 2, "max": 3}, 2),
    ],
)
def test_undeclared_number_default_is_zero_moved_into_bounds(
    bounds: dict[str, int], default: int
) -> None:
    assert field_from_config({"field": "x", "type": "integer", **bounds}).default == default
    f = field_from_config({"field": "x", "type": "float", **bounds})
    assert f.default == float(default) and isinstance(f.default, float)


def test_duplicate_field_names() -> None:
    with pytest.raises(OptionsConfigError, match=r"duplicate option fields \['a'\]"):
        OptionsSpec([Integer("a"), String("a")])


# --- per-group sets ---------------------------------------------------------------------


def config_with_groups(groups: dict[str, tuple[str, ...]] | None) -> OptionsConfig:
    return OptionsConfig(
        fields=(Integer("worker_cores", 1), String("image"), Bool("gpu")), groups=groups
    )


def names(spec: OptionsSpec) -> list[str]:
    return [f.field for f in spec.fields]


def test_no_groups_everyone_sees_everything() -> None:
    assert names(config_with_groups(None).spec_for(User())) == ["worker_cores", "image", "gpu"]
    assert names(config_with_groups({}).spec_for(User())) == ["worker_cores", "image", "gpu"]


def test_groups_union_in_declaration_order() -> None:
    config = config_with_groups({"ml": ("gpu", "worker_cores"), "ops": ("image",)})
    assert names(config.spec_for(User(groups={"ml"}))) == ["worker_cores", "gpu"]
    assert names(config.spec_for(User(groups={"ops"}))) == ["image"]
    assert names(config.spec_for(User(groups={"ml", "ops"}))) == ["worker_cores", "image", "gpu"]


def test_users_in_no_listed_group() -> None:
    without_fallback = config_with_groups({"ml": ("gpu",)})
    assert names(without_fallback.spec_for(User(groups={"other"}))) == [
        "worker_cores",
        "image",
        "gpu",
    ]
    with_fallback = config_with_groups({"ml": ("gpu",), "*": ("worker_cores",)})
    assert names(with_fallback.spec_for(User(groups=set()))) == ["worker_cores"]
    # members of a listed group do not also get the fallback set
    assert names(with_fallback.spec_for(User(groups={"ml"}))) == ["gpu"]


def test_group_sets_validate_their_own_fields() -> None:
    config = config_with_groups({"ml": ("gpu",)})
    spec = config.spec_for(User(groups={"ml"}))
    assert spec.validate({"gpu": True}) == {"gpu": True}
    with pytest.raises(OptionsError, match=r"Unknown fields \['worker_cores'\]"):
        spec.validate({"worker_cores": 2})


def test_groups_with_unknown_fields_are_config_errors() -> None:
    with pytest.raises(OptionsConfigError, match=r"group 'ml' lists unknown fields \['tpu'\]"):
        config_with_groups({"ml": ("tpu",)})


def test_spec_for_keeps_the_handler() -> None:
    def handler(options: Any, user: Any) -> dict[str, Any]:
        return {"n": user.name}

    config = OptionsConfig(fields=(Integer("n"),), handler=handler)
    spec = config.spec_for(User("carol"))
    assert spec.overrides_for(spec.validate({}), User("carol")) == {"n": "carol"}
