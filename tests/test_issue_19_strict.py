"""#19, the strict transform (`_strict.py`): one rule per test, the refusals, and the null
that becomes a default again."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping

import pytest

from tokenhub_stream._strict import MISSING, is_strict_ready, strict_schema, wrap_root


def strict(schema: Mapping[str, object]) -> dict[str, object]:
    return strict_schema(schema, where="test").schema


def obj(properties: Mapping[str, object], **more: object) -> dict[str, object]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
        **more,
    }


def test_issue_19_strict_every_property_required_optional_ones_nullable() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "string"},
            "b": {"type": "integer", "default": 3, "description": "b's text"},
            "c": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
            "d": {"type": ["string", "null"]},
        },
        "required": ["a"],
    }
    result = strict_schema(schema, where="test")
    assert result.schema == obj(
        {
            "a": {"type": "string"},
            "b": {"description": "b's text", "anyOf": [{"type": "integer"}, {"type": "null"}]},
            "c": {"anyOf": [{"type": "string"}, {"type": "null"}]},  # already nullable
            "d": {"type": ["string", "null"]},
        }
    )
    assert result.optional == {id(result.schema): {"b": 3, "c": None, "d": MISSING}}


def test_issue_19_strict_annotations_go_constraints_stay() -> None:
    kept: dict[str, dict[str, object]] = {
        "name": {"type": "string", "pattern": "^[a-z]+$", "description": "lower case"},
        "when": {"type": "string", "format": "date-time"},
        "n": {
            "type": "number",
            "minimum": 0,
            "maximum": 10,
            "exclusiveMinimum": -1,
            "exclusiveMaximum": 11,
            "multipleOf": 0.5,
        },
        "list": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
        "kind": {"type": "string", "enum": ["a", "b"]},
    }
    noisy = {
        name: {**sub, "title": name.title(), "examples": ["x"], "$comment": "c"}
        for name, sub in kept.items()
    }
    schema = {"title": "T", "$schema": "https://json-schema.org/draft/2020-12/schema", **obj(noisy)}
    assert strict(schema) == obj(kept)


def test_issue_19_strict_rewrites_with_the_same_meaning() -> None:
    defs: dict[str, object] = {
        "Cat": obj({"kind": {"const": "cat", "type": "string"}}),
        "Dog": obj({"kind": {"const": "dog", "type": "string"}}),
        "Unit": {"type": "string", "enum": ["C", "F"], "title": "Unit"},
    }
    schema = {
        "$defs": defs,
        "$ref": "#/$defs/Pet",  # the root's $ref is inlined: the root must be an object
    }
    defs["Pet"] = obj(
        {
            "pet": {
                "oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}],
                "discriminator": {"propertyName": "kind"},
            },
            "unit": {"$ref": "#/$defs/Unit", "description": "the unit"},  # inlined
            "plain": {"$ref": "#/$defs/Unit"},  # stays a $ref
            "merged": {"allOf": [{"$ref": "#/$defs/Unit"}], "description": "merged"},
        }
    )
    result = strict(schema)
    cat = obj({"kind": {"type": "string", "enum": ["cat"]}})
    assert result["$defs"]["Cat"] == cat  # type: ignore[index]
    properties = result["properties"]
    assert isinstance(properties, dict)
    assert properties["pet"] == {"anyOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}]}
    unit = {"type": "string", "description": "the unit", "enum": ["C", "F"]}
    assert properties["unit"] == unit
    assert properties["plain"] == {"$ref": "#/$defs/Unit"}
    assert properties["merged"] == {**unit, "description": "merged"}
    assert result["type"] == "object" and "$ref" not in result


def test_issue_19_strict_recursion_stays_a_ref() -> None:
    node = {
        "type": "object",
        "properties": {"child": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}},
    }
    schema = {"$defs": {"Node": node}, "$ref": "#/$defs/Node"}
    result = strict_schema(schema, where="test")
    child = {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}
    assert result.schema == {**obj({"child": child}), "$defs": {"Node": obj({"child": child})}}
    value = {"child": {"child": {"child": None}}}
    assert result.restore_defaults(value) == {"child": {"child": {}}}


@pytest.mark.parametrize(
    ("sub", "match"),
    [
        ({"type": "string", "minLength": 1}, "'minLength' at \\$.x .*pattern"),
        ({"type": "string", "maxLength": 9}, "'maxLength'"),
        ({"type": "string", "format": "uri"}, "format 'uri'"),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "'uniqueItems'"),
        ({"type": "array", "prefixItems": [{"type": "string"}]}, "'prefixItems'"),
        ({"type": "array"}, "an array without items at \\$.x"),
        ({"type": "array", "items": {}}, "a schema without a type at \\$.x\\[\\]"),
        ({}, "a schema without a type at \\$.x"),
        ({"type": "object"}, "an object without properties"),
        ({"type": "object", "properties": {}, "additionalProperties": True}, "additional"),
        (
            {"type": "object", "properties": {}, "additionalProperties": {"type": "string"}},
            "additionalProperties",
        ),
        ({"type": "object", "properties": {}, "patternProperties": {}}, "'patternProperties'"),
        ({"type": "object", "properties": {}, "minProperties": 1}, "'minProperties'"),
        ({"not": {"type": "string"}}, "'not'"),
        ({"type": "string", "if": {}, "then": {}}, "'if'"),
        ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "oneOf"),
        ({"allOf": [{"type": "string"}, {"minLength": 1}]}, "allOf of several"),
        ({"$ref": "http://example.com/x", "description": "remote"}, "only local refs"),
        ({"anyOf": []}, "anyOf is a non-empty list"),
    ],
)
def test_issue_19_strict_refuses_what_it_cannot_express(sub: dict[str, object], match: str) -> None:
    with pytest.raises(TypeError, match=match) as info:
        strict(obj({"x": sub}))
    assert str(info.value).startswith("test: ")
    assert "cannot be expressed in a strict schema" in str(info.value)


def test_issue_19_strict_does_not_change_its_input() -> None:
    schema: dict[str, object] = {
        "type": "object",
        "title": "T",
        "properties": {"a": {"type": "string", "default": "x"}, "b": {"const": 1}},
        "$defs": {"D": {"type": "string", "title": "D"}},
    }
    before = copy.deepcopy(schema)
    strict(schema)
    assert schema == before


def test_issue_19_strict_restore_defaults() -> None:
    inner = {"type": "object", "properties": {"v": {"type": "integer", "default": 1}}}
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}, "default": []},
            "items": {"type": "array", "items": inner},
            "either": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {"kind": {"const": "a"}, "p": {"type": "integer"}},
                        "required": ["kind"],
                    },
                    {
                        "type": "object",
                        "properties": {"kind": {"const": "b"}, "q": {"type": "integer"}},
                        "required": ["kind"],
                    },
                ]
            },
        },
        "required": ["name", "items", "either"],
    }
    result = strict_schema(schema, where="test")
    value = {
        "name": None,  # required: a null stays
        "tags": None,
        "items": [{"v": None}, {"v": 5}],
        "either": {"kind": "b", "q": None},
    }
    frozen = json.dumps(value)
    assert result.restore_defaults(value) == {
        "name": None,
        "items": [{}, {"v": 5}],
        "either": {"kind": "b"},
    }
    assert result.restore_defaults(value, fill=True) == {
        "name": None,
        "tags": [],
        "items": [{"v": 1}, {"v": 5}],
        "either": {"kind": "b"},  # no default: left out
    }
    assert json.dumps(value) == frozen  # a new value: the partial values handed out stay


def test_issue_19_strict_ready_and_wrap() -> None:
    ready = obj({"a": {"type": "string"}})
    assert is_strict_ready(ready)
    assert not is_strict_ready({"type": "object", "properties": {"a": {"type": "string"}}})
    assert not is_strict_ready(obj({"a": {"type": "string", "minLength": 1}}))
    wrapped = wrap_root(
        {"type": "array", "items": {"$ref": "#/$defs/A"}, "$defs": {"A": ready}}, "items"
    )
    assert wrapped == {
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/A"}}},
        "required": ["items"],
        "additionalProperties": False,
        "$defs": {"A": ready},
    }
    assert is_strict_ready(wrapped)
