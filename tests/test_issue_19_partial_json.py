"""The incremental partial-JSON parser behind structured outputs (#19): `_partial_json.py`.

Property tests feed every kind of JSON value, serialised with random whitespace, in random
chunkings (empty and one-character deltas included) and compare with `json.loads`; unit
tests pin each partial-value rule and each error with its position.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenhub_stream._partial_json import DEFAULT_MAX_DEPTH, PartialJSON, PartialJSONError

_NOTHING = object()  # "no value shows yet" in a list of snapshots

# --- helpers -------------------------------------------------------------------------------


def same(a: object, b: object) -> bool:
    """Equality that tells True from 1 and 1 from 1.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        assert isinstance(b, dict)
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        assert isinstance(b, list)
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def is_prefix(part: object, final: object) -> bool:
    """`part` can grow into `final`: containers hold a prefix whose last member is a prefix."""
    if isinstance(final, dict):
        if not isinstance(part, dict) or list(part) != list(final)[: len(part)]:
            return False
        keys = list(part)
        return all(same(part[k], final[k]) for k in keys[:-1]) and (
            not keys or is_prefix(part[keys[-1]], final[keys[-1]])
        )
    if isinstance(final, list):
        if not isinstance(part, list) or len(part) > len(final):
            return False
        return all(same(x, y) for x, y in zip(part[:-1], final, strict=False)) and (
            not part or is_prefix(part[-1], final[len(part) - 1])
        )
    if isinstance(final, str):
        return isinstance(part, str) and final.startswith(part)
    return same(part, final)


def chunkings(text: str, rnd: random.Random) -> list[str]:
    """Cut `text` into random deltas of 0 to `most` characters (empty deltas included)."""
    most = rnd.choice([1, 2, 3, 8, 64])
    out: list[str] = []
    i = 0
    while i < len(text):
        size = rnd.randint(0, most)
        out.append(text[i : i + size])
        i += size
    if rnd.random() < 0.2:
        out.insert(rnd.randint(0, len(out)), "")
    return out


def dump(value: object, ensure_ascii: bool, ws: Callable[[], str]) -> str:
    """`json.dumps` with random JSON whitespace wherever RFC 8259 allows it."""
    if isinstance(value, dict):
        members = [
            f"{ws()}{json.dumps(k, ensure_ascii=ensure_ascii)}{ws()}:{ws()}"
            f"{dump(v, ensure_ascii, ws)}{ws()}"
            for k, v in value.items()
        ]
        return "{" + (",".join(members) or ws()) + "}"
    if isinstance(value, list):
        items = [f"{ws()}{dump(v, ensure_ascii, ws)}{ws()}" for v in value]
        return "[" + (",".join(items) or ws()) + "]"
    return json.dumps(value, ensure_ascii=ensure_ascii)


def whitespace(rnd: random.Random) -> Callable[[], str]:
    pick = ["", "", "", " ", "\n  ", "\t", "\r\n", "    "]
    return lambda: rnd.choice(pick)


def run(
    deltas: list[str], elements_at: tuple[str, ...] | None = ()
) -> tuple[object, list[object], list[object]]:
    """Feed `deltas`; the final value, a snapshot after each delta, the elements reported.

    Checks on the way that `feed()` says "changed" exactly when the value changed, and
    snapshots each completed element when it is reported.
    """
    parser = PartialJSON(elements_at=elements_at)
    snapshots: list[object] = []
    elements: list[object] = []
    before: object = _NOTHING
    for delta in deltas:
        changed = parser.feed(delta)
        now = copy.deepcopy(parser.value) if parser.has_value else _NOTHING
        assert changed == (not same(now, before)), (delta, before, now)
        snapshots.append(now)
        before = now
        elements.extend(copy.deepcopy(parser.completed_elements()))
    final = parser.finish()
    elements.extend(copy.deepcopy(parser.completed_elements()))
    return final, snapshots, elements


# --- strategies ----------------------------------------------------------------------------

_SPECIAL_CHARS = st.sampled_from(
    [
        '"',
        "\\",
        "/",
        "\b",
        "\f",
        "\n",
        "\r",
        "\t",
        "\x00",
        "\x1f",
        "\x7f",
        "é",
        "\u2028",
        "\ufeff",
        "😀",
        "\U0010ffff",
        "\ud83d",  # lone surrogates: json.dumps writes them raw or as \\uXXXX
        "\ude00",
        "\udbff",
    ]
)
_TEXT = st.text(alphabet=st.one_of(st.characters(), _SPECIAL_CHARS), max_size=12)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT
)
_JSON = st.recursive(
    _SCALARS,
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(_TEXT, kids, max_size=5),
    max_leaves=25,
)
_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- properties ----------------------------------------------------------------------------


@_SETTINGS
@given(value=_JSON, ensure_ascii=st.booleans(), seed=st.integers(0, 2**32))
def test_issue_19_any_chunking_parses_to_json_loads(
    value: object, ensure_ascii: bool, seed: int
) -> None:
    rnd = random.Random(seed)
    text = dump(value, ensure_ascii, whitespace(rnd))
    expected = json.loads(text)
    final, snapshots, elements = run(chunkings(text, rnd))
    assert same(final, expected)
    # Every partial value can grow into the final one, and into every later partial value.
    shown = [s for s in snapshots if s is not _NOTHING]
    for earlier, later in zip(shown, [*shown[1:], final], strict=False):
        assert is_prefix(earlier, later), (earlier, later)
        assert is_prefix(earlier, final), (earlier, final)
    # The elements of a top-level list, each reported once, complete, in order.
    assert same(elements, expected if isinstance(expected, list) else [])


@_SETTINGS
@given(
    items=st.lists(_JSON, max_size=6),
    before=_JSON,
    after=_JSON,
    ensure_ascii=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_issue_19_elements_of_a_wrapped_list(
    items: list[object], before: object, after: object, ensure_ascii: bool, seed: int
) -> None:
    rnd = random.Random(seed)
    # What the client sends for a `list[...]` output: json_schema wants an object on top.
    value = {"before": before, "items": items, "after": after}
    text = dump(value, ensure_ascii, whitespace(rnd))
    final, _, elements = run(chunkings(text, rnd), elements_at=("items",))
    assert same(final, json.loads(text))
    assert same(elements, json.loads(text)["items"])


_MUTATION_CHARS = list('{}[]:,"\\ -+.eE0129tfnulasr\x00\n') + ["\\u", "\\ud83d", "é"]


@_SETTINGS
@given(value=_JSON, seed=st.integers(0, 2**32))
def test_issue_19_invalid_json_raises_as_json_loads_does(value: object, seed: int) -> None:
    rnd = random.Random(seed)
    text = dump(value, rnd.random() < 0.5, whitespace(rnd))
    for _ in range(rnd.randint(1, 3)):
        at = rnd.randint(0, len(text))
        kind = rnd.random()
        if kind < 0.4 and text:
            at = min(at, len(text) - 1)
            text = text[:at] + text[at + 1 :]
        elif kind < 0.8:
            text = text[:at] + rnd.choice(_MUTATION_CHARS) + text[at:]
        else:
            text = text[:at]
    try:
        expected = json.loads(text, parse_constant=_refuse)
    except ValueError:  # JSONDecodeError, or an int over the digit limit
        with pytest.raises(PartialJSONError) as info:
            run(chunkings(text, rnd))
        assert 0 <= info.value.pos <= len(text)
    else:
        assert same(run(chunkings(text, rnd))[0], expected)


def _refuse(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


@_SETTINGS
@given(value=_JSON, seed=st.integers(0, 2**32), cut=st.integers(0, 10_000))
def test_issue_19_error_position_does_not_depend_on_chunking(
    value: object, seed: int, cut: int
) -> None:
    rnd = random.Random(seed)
    text = dump(value, True, whitespace(rnd))
    cut %= len(text) + 1
    text = text[:cut] + "\x01" + text[cut:]  # never valid JSON, wherever it lands
    positions = set()
    for deltas in ([text], list(text), chunkings(text, rnd)):
        with pytest.raises(PartialJSONError) as info:
            run(deltas)
        positions.add(info.value.pos)
    assert len(positions) == 1


# --- the rules one by one ------------------------------------------------------------------


def partials(text: str, deltas: list[str] | None = None) -> list[object]:
    """The distinct partial values shown while feeding `text` one character at a time."""
    parser = PartialJSON()
    seen: list[object] = []
    for delta in list(text) if deltas is None else deltas:
        if parser.feed(delta):
            seen.append(copy.deepcopy(parser.value))
    parser.finish()
    return seen


def test_issue_19_strings_show_as_they_grow() -> None:
    assert partials('{"a": "xyz"}') == [{}, {"a": ""}, {"a": "x"}, {"a": "xy"}, {"a": "xyz"}]
    assert partials('"ab"') == ["", "a", "ab"]


@pytest.mark.parametrize(
    ("escaped", "decoded"),
    [
        ("\\u00e9", "é"),
        ("\\ud83d\\ude00", "😀"),
        ('\\n\\"\\\\\\/\\b\\f\\r\\t', '\n"\\/\b\f\r\t'),
        ("\\ud83d", "\ud83d"),  # a lone high surrogate at the end of the string
        ("\\ud83dx", "\ud83dx"),
        ("\\ud83d\\n", "\ud83d\n"),
        ("\\ud83d\\u00e9", "\ud83dé"),
        ("\\ud83d\\ud83d\\ude00", "\ud83d😀"),
        ("\\ude00\\ud83d", "\ude00\ud83d"),
    ],
)
def test_issue_19_escapes_split_anywhere_never_show_half(escaped: str, decoded: str) -> None:
    text = f'["<{escaped}>"]'
    assert json.loads(text) == [f"<{decoded}>"]
    final = f"<{decoded}>"
    for cut in range(len(text) + 1):
        for cut2 in range(cut, len(text) + 1):
            shown = partials(text, [text[:cut], text[cut:cut2], text[cut2:]])
            # Each a prefix of the decoded text: never a half escape, never the high
            # half of a surrogate pair whose low half is still coming.
            for value in shown:
                assert isinstance(value, list)
                assert not value or final.startswith(value[0])
            assert shown[-1] == [final]


def test_issue_19_surrogate_pair_split_shows_no_lone_half() -> None:
    text = '"\\ud83d\\ude00"'
    for cut in range(2, len(text) - 1):  # cuts inside the pair: the opening quote shows ""
        assert partials(text, [text[:cut], text[cut:]]) == ["", "😀"]
    assert partials(text) == ["", "😀"]


def test_issue_19_key_shows_only_with_its_started_value() -> None:
    assert partials('{"name": "x", "n": 12, "ok": true, "sub": {"l": [1]}}') == [
        {},
        {"name": ""},
        {"name": "x"},
        {"name": "x", "n": 12},
        {"name": "x", "n": 12, "ok": True},
        {"name": "x", "n": 12, "ok": True, "sub": {}},
        {"name": "x", "n": 12, "ok": True, "sub": {"l": []}},
        {"name": "x", "n": 12, "ok": True, "sub": {"l": [1]}},
    ]


def test_issue_19_escaped_key_is_decoded_and_never_half() -> None:
    assert partials('{"caf\\u00e9": 1}') == [{}, {"café": 1}]


def test_issue_19_numbers_show_only_once_complete() -> None:
    parser = PartialJSON()
    for delta in ["[1", "2", ".5e", "3", " ", ",-0", "]"]:
        parser.feed(delta)
        if delta in {"[1", "2", ".5e", "3"}:
            assert parser.value == []
    value = parser.value
    assert isinstance(value, list)
    assert same(value, [12.5e3, 0])


def test_issue_19_top_level_number_completes_at_finish() -> None:
    parser = PartialJSON()
    assert parser.feed("-12") is False
    assert not parser.has_value
    assert parser.value is None
    assert parser.finish() == -12
    assert parser.has_value


def test_issue_19_top_level_number_completes_at_whitespace() -> None:
    parser = PartialJSON()
    parser.feed("1.5")
    assert parser.feed("\n") is True
    assert parser.value == 1.5
    assert parser.finish() == 1.5


def test_issue_19_literals_show_only_once_complete() -> None:
    assert partials("", ["[tru", "e, nul", "l, false]"]) == [[], [True], [True, None, False]]


def test_issue_19_value_is_one_object_grown_in_place() -> None:
    parser = PartialJSON()
    parser.feed('{"a": [')
    first = parser.value
    parser.feed('1, "x"], "b": {}}')
    assert parser.finish() is first
    assert first == {"a": [1, "x"], "b": {}}


def test_issue_19_completed_elements_each_once_when_complete() -> None:
    parser = PartialJSON()
    got: list[list[object]] = []
    for delta in ['[{"a": 1', "}, ", '"s', 'tr", 3', ", [", "]", "]"]:
        parser.feed(delta)
        got.append(parser.completed_elements())
    assert got == [[], [{"a": 1}], [], ["str"], [3], [[]], []]
    assert parser.completed_elements() == []


def test_issue_19_completed_elements_last_number_completes_at_bracket() -> None:
    parser = PartialJSON(elements_at=("a", "b"))
    parser.feed('{"x": [9], "a": {"b": [1, 2')
    assert parser.completed_elements() == [1]
    parser.feed("]}}")
    assert parser.completed_elements() == [2]
    assert parser.finish() == {"x": [9], "a": {"b": [1, 2]}}


@pytest.mark.parametrize(
    ("text", "elements_at"),
    [
        ('{"items": {"a": 1}}', ("items",)),  # not a list there
        ('{"items": [1]}', ()),  # the top is not a list
        ("[1, 2]", None),  # reporting turned off
        ('{"other": [1], "items": 3}', ("items",)),
        ('[{"items": [1]}]', ("items",)),  # the path starts at the top
    ],
)
def test_issue_19_completed_elements_only_at_the_path(
    text: str, elements_at: tuple[str, ...] | None
) -> None:
    parser = PartialJSON(elements_at=elements_at)
    parser.feed(text)
    parser.finish()
    assert parser.completed_elements() == []


def test_issue_19_duplicate_key_last_wins_as_json_loads() -> None:
    text = '{"a": 1, "b": 2, "a": [3]}'
    parser = PartialJSON()
    parser.feed(text)
    assert same(parser.finish(), json.loads(text))


@pytest.mark.parametrize(
    ("text", "pos", "message"),
    [
        ("{,", 1, "Expecting property name"),
        ('{"a" 1}', 5, "Expecting ':' delimiter"),
        ('{"a": 1,}', 8, "Expecting property name"),
        ("[1,]", 3, "Expecting value"),
        ("[1 2]", 3, "Expecting ',' or ']'"),
        ('{"a": 1 "b"}', 8, "Expecting ',' or '}'"),
        ("[01]", 2, "Invalid number"),
        ("[1.e5]", 3, "Invalid number"),
        ("[--1]", 2, "Invalid number"),
        ("[-]", 2, "Incomplete number"),
        ("[1.]", 3, "Incomplete number"),
        ("[1e+", 4, "Unexpected end"),  # at finish: the end of the text
        ("-", 1, "Incomplete number"),
        ("-0.", 3, "Incomplete number"),
        ("[tru e]", 4, "Invalid literal"),
        ("[nul]", 4, "Invalid literal"),
        ("NaN", 0, "Expecting value"),
        ("[Infinity]", 1, "Expecting value"),
        ('"\\x"', 2, "Invalid \\escape"),
        ('"\\u12g4"', 5, "Invalid \\uXXXX escape"),
        ('"\\ud83d\\uzz00"', 9, "Invalid \\uXXXX escape"),
        ('"a\nb"', 2, "Invalid control character"),
        ("{} x", 3, "Extra data"),
        ('"ab', 3, "Unterminated string starting at char 0"),
        ('["a", "b\\u00', 12, "Unterminated string starting at char 6"),
        ("[1, [2", 6, "Unexpected end"),
        ("[1, tr", 6, "Incomplete 'true'"),
        ("", 0, "Expecting value"),
        (" \n ", 3, "Expecting value"),
        ("\ufeff[]", 0, "Expecting value"),
    ],
)
def test_issue_19_errors_name_the_position_where_seen(text: str, pos: int, message: str) -> None:
    with pytest.raises(ValueError):
        json.loads(text, parse_constant=_refuse)
    # Fed whole, or one character at a time: the delta holding `pos` raises (or finish()).
    for deltas in ([text], list(text)):
        parser = PartialJSON()
        fed, current = 0, ""
        with pytest.raises(PartialJSONError) as info:
            for current in deltas:
                parser.feed(current)
                fed += len(current)
            current = ""  # finish() raised
            parser.finish()
        assert info.value.pos == pos
        assert info.value.msg.startswith(message)
        assert str(info.value) == f"{info.value.msg} at char {pos}"
        assert fed <= pos <= fed + len(current)
        assert pos < fed + len(current) or not current


def test_issue_19_error_is_sticky() -> None:
    parser = PartialJSON()
    with pytest.raises(PartialJSONError) as first:
        parser.feed("[1,,")
    for again in (lambda: parser.feed(""), lambda: parser.feed("2]"), parser.finish):
        with pytest.raises(PartialJSONError) as info:
            again()
        assert info.value is first.value
    assert "failed" in repr(parser)


def test_issue_19_depth_is_bounded() -> None:
    deep = "[" * DEFAULT_MAX_DEPTH + "]" * DEFAULT_MAX_DEPTH
    parser = PartialJSON()
    parser.feed(deep)
    assert parser.finish() == json.loads(deep)
    parser = PartialJSON()
    with pytest.raises(PartialJSONError, match="max_depth=128") as info:
        parser.feed('{"a": ' + "[" * DEFAULT_MAX_DEPTH)
    assert info.value.pos == 6 + DEFAULT_MAX_DEPTH - 1
    parser = PartialJSON(max_depth=2)
    with pytest.raises(PartialJSONError, match="max_depth=2"):
        parser.feed('[{"a": [')
    with pytest.raises(ValueError, match="max_depth"):
        PartialJSON(max_depth=0)
    with pytest.raises(TypeError, match=r"\('items',\)"):
        PartialJSON(elements_at="items")


def test_issue_19_long_numbers_are_checked_when_they_end() -> None:
    digits = "0." + "1" * 300
    parser = PartialJSON()
    for i in range(0, len(digits), 7):
        parser.feed(digits[i : i + 7])
    assert parser.finish() == json.loads(digits)
    parser = PartialJSON()
    parser.feed("[" + digits + "." + "1" * 10)
    with pytest.raises(PartialJSONError, match="Invalid number") as info:
        parser.feed("]")
    assert info.value.pos == 1 + len(digits)


def test_issue_19_int_over_the_digit_limit_is_a_clear_error() -> None:
    text = "[" + "1" * 5000 + "]"
    with pytest.raises(ValueError):
        json.loads(text)
    parser = PartialJSON()
    with pytest.raises(PartialJSONError, match="Number too long"):
        parser.feed(text)


def test_issue_19_whitespace_between_every_token() -> None:
    text = ' \t{ "a" :\r\n [ 1 , true , "x" , { } , [ ] ] , "b" : null } \n'
    assert partials(text)[-1] == json.loads(text)


def test_issue_19_repr_and_position() -> None:
    parser = PartialJSON()
    parser.feed('{"a": "b')
    assert repr(parser) == "<PartialJSON pos=8 depth=1 state='string'>"
    assert parser.position == 8


def test_issue_19_a_string_handed_out_never_changes() -> None:
    # The open string grows in place only while nothing else holds it: one read by the
    # consumer must keep its text whatever is fed after.
    parser = PartialJSON()
    parser.feed('{"a": "xy')
    value = parser.value
    assert isinstance(value, dict)
    held = value["a"]
    parser.feed("z" * 1000)
    assert held == "xy"
    assert parser.value == {"a": "xy" + "z" * 1000}
    parser.feed('é"}')
    assert held == "xy"
    assert parser.finish() == {"a": "xy" + "z" * 1000 + "é"}
