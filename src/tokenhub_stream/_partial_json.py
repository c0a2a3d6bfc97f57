"""Sans-I/O incremental parser of streamed JSON: text deltas in, a growing value out (#19).

`PartialJSON.feed(delta)` costs time proportional to the delta, never to the text so far:
the parser keeps a stack of the open containers and mutates the partial value in place,
so nothing fed earlier is scanned or built again. `benchmarks/structured_bench.py`
measures this against re-parsing the accumulated text after every delta (what the
openai SDK does with jiter's partial mode), which is quadratic on long outputs.

What the partial value shows (each rule keeps every partial value a *prefix* of the final
one, so a consumer never has to take anything back):

- dicts and lists only grow, in place: a dict gains keys, a list gains elements, and only
  the last member may still change;
- a string shows its decoded prefix as it grows, not only once closed; an escape sequence
  is shown only whole (`\\u00e9` split anywhere, a surrogate pair split anywhere), so a
  half escape never appears;
- a key appears only once its string is closed *and* its value has started to show: `""`
  at the value's opening quote, `{}`/`[]` at its bracket, a number or literal once it is
  complete. A dict never shows a half key nor a key with a placeholder value;
- a number is shown only once complete, i.e. when a delimiter (`,` `]` `}` or whitespace)
  follows it or at `finish()`; `true`/`false`/`null` once their last letter arrives.

The value is one object grown in place, never rebuilt: consumers get the live object
(cheap; copy it to keep a snapshot: a deep copy per change is quadratic, measured), and
completed elements of a chosen list (`elements_at`) are reported once, whole. The open
string is appended to in place when nothing else holds it (CPython), so even one long
string read after every delta stays linear.

Errors: invalid JSON raises `PartialJSONError` (a `ValueError`) as soon as the offending
character is fed, with its position in the streamed text; the parser then stays failed.
Strict JSON only: no `NaN`/`Infinity`, no raw control characters in strings, nesting
bounded by `max_depth`. Otherwise the result of `finish()` equals `json.loads(text)`,
duplicate keys included (the last one wins, in the first one's place).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import cast

__all__ = ["DEFAULT_MAX_DEPTH", "PartialJSON", "PartialJSONError"]

#: The nesting bound serde_json uses by default; far above any structured output.
DEFAULT_MAX_DEPTH = 128

# Parser states. Ints compared with `==` are the cheapest dispatch in the per-delta loop.
_VALUE = 0  # a value must come: at the start, after ':' and after ',' in a list
_LIST_FIRST = 1  # after '[': a value or ']'
_OBJ_FIRST = 2  # after '{': a key or '}'
_KEY = 3  # after ',' in an object: a key
_COLON = 4  # after a key
_AFTER = 5  # after a member of a container: ',' or its closing bracket
_STRING = 6  # inside a string (a key or a value)
_ESCAPE = 7  # inside an escape sequence split across deltas
_NUMBER = 8
_LITERAL = 9  # inside true / false / null
_END = 10  # after the top-level value: whitespace only

_STATE_NAMES = (
    "value",
    "list",
    "object",
    "key",
    "colon",
    "after-member",
    "string",
    "escape",
    "number",
    "literal",
    "end",
)

# The `...*` patterns always match: typed as such, so the hot loop calls `.end()` directly.
_Run = Callable[..., "re.Match[str]"]

_WS = " \t\n\r"
_WS_RUN = cast(_Run, re.compile(r"[ \t\n\r]*").match)
# A run of string characters that need no decoding (RFC 8259 section 7: `"`, `\` and
# U+0000-U+001F must be escaped).
_PLAIN_RUN = cast(_Run, re.compile(r'[^"\\\x00-\x1f]*').match)
_NUMBER_RUN = cast(_Run, re.compile(r"[0-9eE.+\-]*").match)
_NUMBER_FULL = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+\-]?[0-9]+)?").fullmatch
# What can still grow into a number: matched against a number so far, its end is where
# the number went wrong.
_NUMBER_PREFIX = cast(
    _Run,
    re.compile(
        r"-?(?:(?:0|[1-9][0-9]*)(?:\.(?:[0-9]+(?:[eE][+\-]?[0-9]*)?)?|[eE][+\-]?[0-9]*)?)?"
    ).match,
)
# A number longer than this is checked for validity when it ends instead of at every
# delta, so that a pathological long number still costs linear time.
_EAGER_NUMBER_CHECK = 100
_HEX4 = cast(_Run, re.compile(r"[0-9a-fA-F]{0,4}").match)
_SIMPLE_ESCAPES = {
    '"': '"',
    "\\": "\\",
    "/": "/",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
}
_LITERALS: dict[str, tuple[str, object]] = {
    "t": ("true", True),
    "f": ("false", False),
    "n": ("null", None),
}

Container = dict[str, object] | list[object]


class PartialJSONError(ValueError):
    """Raised when the streamed text is not valid JSON, as soon as that can be seen.

    Attributes:
        msg: what was wrong, without the position.
        pos: the offset (in characters) in the whole streamed text where it went wrong.
    """

    def __init__(self, msg: str, pos: int) -> None:
        super().__init__(f"{msg} at char {pos}")
        self.msg = msg
        self.pos = pos


class _BadEscape(Exception):
    """An invalid escape at `offset` in the buffer being decoded (mapped to a position)."""

    def __init__(self, msg: str, offset: int) -> None:
        self.msg = msg
        self.offset = offset


def _check_hex(s: str, start: int, stop: int) -> None:
    end = _HEX4(s, start, stop).end()
    if end < stop:
        raise _BadEscape("Invalid \\uXXXX escape", end)


def _decode_escape(s: str, p: int) -> tuple[str, int] | None:
    """Decode the escape sequence at `s[p]` (a backslash).

    Returns the decoded text and the index after the escape, or None while `s` ends before
    the escape can be decided. Pairs surrogates as `json.loads` does: a `\\uD800-\\uDBFF`
    escape directly followed by a `\\uDC00-\\uDFFF` escape is one character; otherwise each
    stays a lone surrogate. So a high surrogate is held until the next 6 characters tell.
    """
    n = len(s)
    if p + 1 >= n:
        return None
    c = s[p + 1]
    if c != "u":
        simple = _SIMPLE_ESCAPES.get(c)
        if simple is None:
            raise _BadEscape("Invalid \\escape", p + 1)
        return simple, p + 2
    if p + 6 > n:
        _check_hex(s, p + 2, n)
        return None
    _check_hex(s, p + 2, p + 6)
    code = int(s[p + 2 : p + 6], 16)
    if not 0xD800 <= code <= 0xDBFF:
        return chr(code), p + 6
    if p + 6 >= n:
        return None
    if s[p + 6] != "\\":
        return chr(code), p + 6
    if p + 7 >= n:
        return None
    if s[p + 7] != "u":
        return chr(code), p + 6
    if p + 12 > n:
        _check_hex(s, p + 8, n)
        return None
    _check_hex(s, p + 8, p + 12)
    low = int(s[p + 8 : p + 12], 16)
    if 0xDC00 <= low <= 0xDFFF:
        return chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)), p + 12
    return chr(code), p + 6


_NO_TARGET: list[object] = []  # never a container of ours: "no element list yet"


class PartialJSON:
    """Incremental parser of one JSON value streamed as text deltas.

    ```python
    parser = PartialJSON(elements_at=("items",))
    for delta in ['{"items": [{"name": "Ad', 'a"}, {"na', 'me": "Bob"}]}']:
        if parser.feed(delta):
            print(parser.value)  # the same dict each time, grown in place
        for element in parser.completed_elements():
            print("complete:", element)
    assert parser.finish() == {"items": [{"name": "Ada"}, {"name": "Bob"}]}
    ```

    `value` is the one partial value, mutated in place as deltas arrive (see the module
    docstring for what it shows): read it, do not mutate it, and copy it to keep a
    snapshot. Handing out the live object keeps each delta's cost proportional to the
    delta; a copy per change would be quadratic in the size of the output.

    Args:
        elements_at: the path of dict keys from the top-level value to the list whose
            elements `completed_elements()` reports: `()` (the default) for a top-level
            list, `("items",)` for `{"items": [...]}`, None to report none.
        max_depth: how many containers may be open at once; one more raises
            `PartialJSONError`.

    Raises:
        TypeError: if `elements_at` is a string (a path is a sequence of keys).
        ValueError: if `max_depth` is below 1.
    """

    __slots__ = (
        "_along",
        "_container",
        "_elements",
        "_error",
        "_esc",
        "_esc_pos",
        "_has_value",
        "_in_key",
        "_is_dict",
        "_key",
        "_keys",
        "_lit",
        "_lit_value",
        "_lit_pos",
        "_max_depth",
        "_num_len",
        "_num_parts",
        "_num_pos",
        "_offset",
        "_parts",
        "_path",
        "_root",
        "_stack",
        "_state",
        "_str_pos",
        "_target",
    )

    def __init__(
        self, *, elements_at: Sequence[str] | None = (), max_depth: int = DEFAULT_MAX_DEPTH
    ) -> None:
        if isinstance(elements_at, str):
            raise TypeError(f"elements_at is a sequence of keys, e.g. ({elements_at!r},)")
        if max_depth < 1:
            raise ValueError(f"max_depth must be at least 1, not {max_depth}")
        self._max_depth = max_depth
        self._path: tuple[str, ...] = () if elements_at is None else tuple(elements_at)
        # How many open containers, from the top, lie along `elements_at`; -1: no path.
        self._along = -1 if elements_at is None else 0
        self._target: list[object] = _NO_TARGET
        self._elements: list[object] = []
        self._state = _VALUE
        self._error: PartialJSONError | None = None
        self._offset = 0  # characters fed before the current delta
        self._root: object = None
        self._has_value = False
        self._stack: list[Container] = []
        self._keys: list[str] = []  # the parent's key under each open container
        self._container: Container | None = None  # the innermost open container
        self._is_dict = False
        self._key = ""  # the current member's key in the innermost dict
        # The open string: its slot in the value shows what was joined so far, `_parts`
        # the decoded text not yet joined (when `value` is read or the string closes).
        self._in_key = False
        self._parts: list[str] = []
        self._str_pos = 0
        self._esc = ""  # an escape sequence split across deltas, from its backslash
        self._esc_pos = 0
        self._num_parts: list[str] = []
        self._num_len = 0
        self._num_pos = 0
        self._lit = ""
        self._lit_value: object = None
        self._lit_pos = 0

    def __repr__(self) -> str:
        return (
            f"<PartialJSON pos={self._offset} depth={len(self._stack)} "
            f"state={_STATE_NAMES[self._state]!r}{' failed' if self._error else ''}>"
        )

    @property
    def value(self) -> object:
        """The partial value so far (None before anything shows: see `has_value`)."""
        if self._parts and not self._in_key:
            self._join_string()
        return self._root

    @property
    def has_value(self) -> bool:
        """Whether any of the value shows yet (a top-level number shows only once whole)."""
        return self._has_value

    @property
    def position(self) -> int:
        """How many characters have been fed."""
        return self._offset

    def completed_elements(self) -> list[object]:
        """The elements of the `elements_at` list completed since the last call, in order.

        Each is the element's final value (the same object the partial value holds).
        """
        out = self._elements
        self._elements = []
        return out

    def feed(self, text: str) -> bool:
        """Parse the next delta of the streamed text.

        Returns:
            Whether the partial value changed (`value` differs from before this call).

        Raises:
            PartialJSONError: the text so far cannot be the start of a JSON value (again
                on every later call once raised).
        """
        if self._error is not None:
            raise self._error
        n = len(text)
        i = 0
        changed = False
        try:
            while i < n:
                state = self._state
                if state == _STRING:
                    j = _PLAIN_RUN(text, i).end()
                    if j > i:
                        self._parts.append(text[i:j])
                        if not self._in_key:
                            changed = True
                        if j == n:
                            break
                    c = text[j]
                    if c == '"':
                        i = j + 1
                        self._close_string()
                    elif c == "\\":
                        try:
                            decoded = _decode_escape(text, j)
                        except _BadEscape as exc:
                            raise self._fail(exc.msg, exc.offset) from None
                        if decoded is None:
                            self._esc = text[j:]
                            self._esc_pos = self._offset + j
                            self._state = _ESCAPE
                            break
                        self._parts.append(decoded[0])
                        if not self._in_key:
                            changed = True
                        i = decoded[1]
                    else:
                        raise self._fail("Invalid control character in string", j)
                    continue
                if state == _NUMBER:
                    j = _NUMBER_RUN(text, i).end()
                    if j > i:
                        self._num_parts.append(text[i:j])
                        self._num_len += j - i
                        if self._num_len <= _EAGER_NUMBER_CHECK:
                            self._check_number_prefix()
                        i = j
                    if i < n:  # any other character ends the number; the next state judges it
                        self._end_number()
                        changed = True
                    continue
                if state == _ESCAPE:
                    shown = len(self._parts)
                    i = self._continue_escape(text, i)
                    if len(self._parts) > shown and not self._in_key:
                        changed = True
                    continue
                if state == _LITERAL:
                    i = self._continue_literal(text, i)
                    if self._state != _LITERAL:
                        changed = True
                    continue
                c = text[i]
                if c in _WS:
                    i = _WS_RUN(text, i).end()
                    continue
                if state == _AFTER:
                    i += 1
                    if c == ",":
                        self._state = _KEY if self._is_dict else _VALUE
                    elif c == ("}" if self._is_dict else "]"):
                        self._pop()
                    else:
                        expected = "'}'" if self._is_dict else "']'"
                        raise self._fail(f"Expecting ',' or {expected} delimiter", i - 1)
                elif state == _VALUE or state == _LIST_FIRST:
                    if c == '"':
                        i += 1
                        self._open_string(False, i - 1)
                        self._put("")
                        changed = True
                    elif c == "{" or c == "[":
                        i += 1
                        self._push({} if c == "{" else [], i - 1)
                        changed = True
                    elif c in "-0123456789":
                        self._state = _NUMBER
                        self._num_parts = []
                        self._num_len = 0
                        self._num_pos = self._offset + i
                    elif c in _LITERALS:
                        self._lit, self._lit_value = _LITERALS[c]
                        self._lit_pos = self._offset + i
                        self._state = _LITERAL
                    elif c == "]" and state == _LIST_FIRST:
                        i += 1
                        self._pop()
                    else:
                        raise self._fail("Expecting value", i)
                elif state == _KEY or state == _OBJ_FIRST:
                    i += 1
                    if c == '"':
                        self._open_string(True, i - 1)
                    elif c == "}" and state == _OBJ_FIRST:
                        self._pop()
                    else:
                        raise self._fail("Expecting property name enclosed in double quotes", i - 1)
                elif state == _COLON:
                    if c != ":":
                        raise self._fail("Expecting ':' delimiter", i)
                    i += 1
                    self._state = _VALUE
                else:  # _END
                    raise self._fail("Extra data", i)
        finally:
            self._offset += n
        return changed

    def finish(self) -> object:
        """Check the whole text was one complete JSON value and return it.

        Completes a top-level number (which only the end of the text can end).

        Returns:
            The final value: equal to `json.loads` of the whole text.

        Raises:
            PartialJSONError: the text ended before the value was complete (the position
                is the end of the text).
        """
        if self._error is not None:
            raise self._error
        end = self._offset
        if self._state == _NUMBER and not self._stack:
            self._end_number()
        state = self._state
        if state != _END:
            if state == _STRING or state == _ESCAPE:
                what = f"Unterminated string starting at char {self._str_pos}"
            elif state == _LITERAL:
                what = f"Incomplete {self._lit!r} starting at char {self._lit_pos}"
            elif state == _VALUE and not self._stack:
                what = "Expecting value"
            else:
                what = f"Unexpected end of JSON input with {len(self._stack)} open container(s)"
            self._error = PartialJSONError(what, end)
            raise self._error
        return self.value

    # -- helpers; `_fail`/`_put`/... take positions inside the current delta --------------

    def _fail(self, msg: str, i: int) -> PartialJSONError:
        self._error = PartialJSONError(msg, self._offset + i)
        return self._error

    def _put(self, value: object) -> None:
        container = self._container
        if container is None:
            self._root = value
            self._has_value = True
        elif self._is_dict:
            container[self._key] = value  # type: ignore[call-overload]
        else:
            container.append(value)  # type: ignore[union-attr]

    def _completed(self, value: object) -> None:
        if self._container is self._target:
            self._elements.append(value)
        self._state = _AFTER if self._stack else _END

    def _push(self, new: Container, i: int) -> None:
        depth = len(self._stack)
        if depth >= self._max_depth:
            raise self._fail(f"Nesting deeper than max_depth={self._max_depth}", i)
        self._put(new)
        path = self._path
        if self._along == depth and depth <= len(path):
            if depth == 0 or (self._is_dict and self._key == path[depth - 1]):
                self._along = depth + 1
                if depth == len(path) and type(new) is list:
                    self._target = new
        self._stack.append(new)
        self._keys.append(self._key)
        self._container = new
        self._is_dict = type(new) is dict
        self._key = ""
        self._state = _OBJ_FIRST if self._is_dict else _LIST_FIRST

    def _pop(self) -> None:
        stack = self._stack
        closed = stack.pop()
        self._key = self._keys.pop()
        if stack:
            container = stack[-1]
            self._container = container
            self._is_dict = type(container) is dict
        else:
            self._container = None
        if self._along > len(stack):
            self._along = len(stack)
        self._completed(closed)

    def _open_string(self, is_key: bool, i: int) -> None:
        self._state = _STRING
        self._in_key = is_key
        self._parts = []
        self._str_pos = self._offset + i

    def _join_string(self) -> str:
        # The string is taken out of its slot while it grows: with no other reference,
        # CPython appends to it in place instead of copying it, so reading `value` after
        # every delta of one long string stays linear. Where another reference exists (a
        # consumer kept the string) or on other interpreters, it is a copy, as usual.
        tail = "".join(self._parts)
        self._parts.clear()
        container = self._container
        text: str
        if container is None:
            text, self._root = self._root, None  # type: ignore[assignment]
            text += tail
            self._root = text
        elif self._is_dict:
            key = self._key
            text, container[key] = container[key], ""  # type: ignore[assignment, call-overload]
            text += tail
            container[key] = text  # type: ignore[call-overload]
        else:
            text, container[-1] = container[-1], ""  # type: ignore[assignment, index]
            text += tail
            container[-1] = text  # type: ignore[index]
        return text

    def _close_string(self) -> None:
        if self._in_key:
            self._key = "".join(self._parts)
            self._parts = []
            self._state = _COLON
        else:
            self._completed(self._join_string())

    def _continue_escape(self, text: str, i: int) -> int:
        # The buffered start of an escape plus at most the 12 characters that can finish
        # it; a lone high surrogate can leave a backslash of the buffer to decode again.
        while True:
            buffered = self._esc
            s = buffered + text[i : i + 12]
            try:
                decoded = _decode_escape(s, 0)
            except _BadEscape as exc:
                self._error = PartialJSONError(exc.msg, self._esc_pos + exc.offset)
                raise self._error from None
            if decoded is None:
                self._esc = s
                return len(text)
            self._parts.append(decoded[0])
            taken = decoded[1] - len(buffered)
            if taken >= 0:
                self._esc = ""
                self._state = _STRING
                return i + taken
            self._esc = buffered[decoded[1] :]
            self._esc_pos += decoded[1]

    def _continue_literal(self, text: str, i: int) -> int:
        lit = self._lit
        have = self._offset + i - self._lit_pos
        chunk = text[i : i + len(lit) - have]
        if chunk != lit[have : have + len(chunk)]:
            bad = next(k for k, ch in enumerate(chunk) if ch != lit[have + k])
            raise self._fail(f"Invalid literal (expecting {lit!r})", i + bad)
        i += len(chunk)
        if have + len(chunk) == len(lit):
            self._put(self._lit_value)
            self._completed(self._lit_value)
        return i

    def _check_number_prefix(self) -> None:
        number = "".join(self._num_parts)
        end = _NUMBER_PREFIX(number).end()
        if end < len(number):
            self._error = PartialJSONError("Invalid number", self._num_pos + end)
            raise self._error

    def _end_number(self) -> None:
        number = "".join(self._num_parts)
        if _NUMBER_FULL(number) is None:
            end = _NUMBER_PREFIX(number).end()
            msg = "Invalid number" if end < len(number) else "Incomplete number"
            self._error = PartialJSONError(msg, self._num_pos + end)
            raise self._error
        value: object
        try:
            value = (
                float(number) if "." in number or "e" in number or "E" in number else int(number)
            )
        except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
            self._error = PartialJSONError("Number too long", self._num_pos)
            raise self._error from None
        self._num_parts = []
        self._put(value)
        self._completed(value)
