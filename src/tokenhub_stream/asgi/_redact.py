"""The key, sans-I/O: its checks at construction and its redaction from whatever the
upstream echoes (docs/proxy.md, "Key redaction").

Internal interface of `tokenhub_stream.asgi`.
"""

from __future__ import annotations

import re

__all__: list[str] = []


def check_api_key(api_key: str) -> None:
    """Refuse a key that cannot be a header value as it stands (a `ValueError`).

    A key read from a file or an environment variable often keeps its trailing newline;
    sent as is, the request fails far from the cause ("could not reach the upstream").
    The message never repeats the key.
    """
    if not all(0x21 <= ord(c) <= 0x7E for c in api_key):
        raise ValueError(
            "api_key contains whitespace, a control character or a non-ASCII character "
            "(a trailing newline from a file or an environment variable?): strip it"
        )


REDACTED = b"[redacted]"


# Keys this long are matched in their variant forms too; shorter ones are placeholders
# such as "EMPTY" for a local server, where a case-blind match would eat ordinary words.
_MIN_VARIANT_KEY = 16


# The length of the two anchors searched for in every write. It bounds what a cut key can
# leak (15 characters); CPython's `in` prepares its needle on every call, so on the usual
# 200-300-byte event two 16-byte searches cost about as much as two searches for the key.
_ANCHOR = 16


# The rest of a key cut across two writes is looked for only from this length: a shorter
# rest leaks too little to matter and would match by chance.
_MIN_REST = 4


# ... in the next few writes: a keep-alive comment or an Azure filter frame may come between
# the two pieces.
_REST_WRITES = 4


_SHORT_ESCAPES = frozenset(b'"\\/')


def _form(c: int) -> bytes:
    # One key character as JSON may carry it: itself in either case, \u00XX (hex digits
    # in either case), or a two-character escape for " \ and /.
    char = bytes([c])
    forms = [b"[" + char.lower() + char.upper() + b"]" if char.isalpha() else re.escape(char)]
    digits = b"".join(
        b"[" + d.lower() + d.upper() + b"]" if d.isalpha() else d
        for d in (bytes([x]) for x in b"%02x" % c)
    )
    forms.append(rb"\\u00" + digits)
    if c in _SHORT_ESCAPES:
        forms.append(re.escape(b"\\" + char))
    return b"(?:" + b"|".join(forms) + b")"


def _forms(part: bytes) -> bytes:
    return b"".join(_form(c) for c in part)


class KeyRedactor:
    """The forms of the upstream key to take out of what the proxy relays (one per proxy).

    `redactor(data)` redacts a whole body; `redactor.stream()` gives the redactor of one
    stream, which also catches a key cut across two of its writes. Each find becomes
    `[redacted]`; nothing is ever held back.

    A key of 16 characters or more is found in any mix of letter case and with any of its
    characters JSON-escaped (`\\u002d`, `\\u002D`, `\\/`). Each write is searched for two
    anchors, the first 16 characters of the key and the 16 from its middle, in those
    forms; a find is widened to the whole run of key characters around it. So a key cut in
    two (a model or gateway streaming it as two deltas) is caught: if the first piece holds
    the first anchor, it is redacted and the next 4 writes are searched for the rest (when
    4 characters or more remain); otherwise the second piece holds the middle anchor and is
    redacted, and the browser has seen at most the first 15 characters. Not caught: a
    key cut in more pieces of which none holds an anchor (a model spelling it out token by
    token), other encodings (base64, hex, URL or HTML escapes) and a reversed key. A
    shorter key (a placeholder such as `EMPTY`) is matched as its exact bytes only.

    A write with no key in sight costs a lower-cased copy, two 16-byte substring searches
    and a search for a backslash.
    """

    __slots__ = ("_anchors", "_codes", "_exact", "_find", "_key", "_rests", "_short", "_starts")

    def __init__(self, key: str) -> None:
        raw = key.encode()
        self._key = raw
        self._exact = len(raw) < _MIN_VARIANT_KEY
        middle = len(raw) // 2
        size = min(_ANCHOR, middle)
        self._starts = (0, middle)
        self._anchors = (raw[:size].lower(), raw[middle : middle + size].lower())
        self._find = re.compile(
            b"(?P<a>"
            + _forms(raw[:size])
            + b")|(?P<b>"
            + _forms(raw[middle : middle + size])
            + b")"
        )
        # The hex of the key's own characters (lower-cased, as in the lower-cased copy
        # searched): other escapes (non-ASCII text, Go's \u003c) pass.
        self._codes = frozenset(b"%02x" % c for c in raw)
        # \/ \" \\ of the key's own characters: only a key holding one of them (base64
        # keys hold "/") pays for this check.
        self._short = tuple(bytes((0x5C, c)) for c in sorted(set(raw) & _SHORT_ESCAPES))
        self._rests: dict[int, re.Pattern[bytes]] = {}

    def __repr__(self) -> str:
        return "KeyRedactor()"  # never the key

    def __call__(self, data: bytes) -> bytes:
        return self._redact(data)[0]

    def stream(self) -> StreamRedactor:
        return StreamRedactor(self)

    def _redact(self, data: bytes) -> tuple[bytes, int]:
        # (redacted data, where in the key a run it ended with stops, else 0).
        if self._exact:
            key = self._key
            return (data.replace(key, REDACTED) if key in data else data), 0
        low = data.lower()
        first, second = self._anchors
        if first in low or second in low or (b"\\" in low and self._escaped(low)):
            return self._scan(data)
        return data, 0

    def _escaped(self, low: bytes) -> bool:
        # A \u00XX escape of one of the key's characters (a loop of finds: cheaper than a
        # regex call for the one or two escapes an event holds), or \/ \" \\ of one.
        find, codes = low.find, self._codes
        at = find(b"\\u00")
        while at >= 0:
            if low[at + 4 : at + 6] in codes:
                return True
            at = find(b"\\u00", at + 4)
        return bool(self._short) and any(s in low for s in self._short)

    def _scan(self, data: bytes) -> tuple[bytes, int]:
        key = self._key
        spans: list[tuple[int, int]] = []
        pending = 0
        size = len(self._anchors[0])
        for match in self._find.finditer(data):
            first = self._starts[0 if match.lastgroup == "a" else 1]
            start, i = match.start(), first
            while i > 0:
                n = _form_before(data, start, key[i - 1])
                if not n:
                    break
                start, i = start - n, i - 1
            end, j = match.end(), first + size
            while j < len(key):
                n = _form_at(data, end, key[j])
                if not n:
                    break
                end, j = end + n, j + 1
            spans.append((start, end))
            pending = j if j < len(key) else 0
            if pending:
                # The rest of a cut key may follow in this same write (two events that
                # arrived together): look for it here before the next writes.
                rest = self._rest_pattern(pending)
                after = rest.search(data, end) if rest is not None else None
                if after is not None:
                    spans.append(after.span())
                    pending = 0
        if not spans:
            return data, 0
        return _cut(data, spans), pending

    def _rest_pattern(self, done: int) -> re.Pattern[bytes] | None:
        # The forms of key[done:] (a cut key's second piece); None when too short to tell.
        rest = self._key[done:]
        if len(rest) < _MIN_REST:
            return None
        pattern = self._rests.get(done)
        if pattern is None:
            pattern = self._rests[done] = re.compile(_forms(rest))
        return pattern

    def _rest(self, data: bytes, done: int) -> bytes | None:
        # A write after one that ended with a run up to key[done]: take out the first
        # key[done:] (a cut key's second piece). None: not in this write.
        pattern = self._rest_pattern(done)
        if pattern is None:
            return data
        match = pattern.search(data)
        if match is None:
            return None
        return _cut(data, [match.span()])


class StreamRedactor:
    """`KeyRedactor` for one stream: `feed(write) -> write`, never holding bytes back."""

    __slots__ = ("_first", "_left", "_pending", "_second", "_shared")

    def __init__(self, shared: KeyRedactor) -> None:
        self._shared = shared
        self._pending = 0  # where in the key a run a recent write ended with stops
        self._left = 0  # the writes still searched for the rest of that run
        # KeyRedactor._redact inlined (one call less per write); b"" for a short key.
        self._first, self._second = (b"", b"") if shared._exact else shared._anchors

    def feed(self, data: bytes) -> bytes:
        shared = self._shared
        if self._pending:
            cut = shared._rest(data, self._pending)
            self._left -= 1
            if cut is not None or not self._left:
                self._pending = 0
            if cut is not None:
                data = cut
        first = self._first
        if not first:
            return shared._redact(data)[0]
        low = data.lower()
        if not (first in low or self._second in low):
            if b"\\" not in low:  # memchr: the common case ends here
                return data
            # JSON escapes (often \n or \"): only those of the key's characters matter.
            if not shared._escaped(low):
                return data
        data, pending = shared._scan(data)
        if pending:
            self._pending, self._left = pending, _REST_WRITES
        return data


def _form_at(data: bytes, pos: int, c: int) -> int:
    # The length of key character `c`'s form starting at `pos`, else 0. Escapes first:
    # read as raw characters, "\u0041" would end in the key characters "0041".
    if data.startswith(b"\\u00", pos) and data[pos + 4 : pos + 6].lower() == b"%02x" % c:
        return 6
    if c in _SHORT_ESCAPES and data.startswith(bytes((0x5C, c)), pos):
        return 2
    if data[pos : pos + 1].lower() == bytes([c]).lower():
        return 1
    return 0


def _form_before(data: bytes, pos: int, c: int) -> int:
    # The length of key character `c`'s form ending at `pos`, else 0.
    if (
        pos >= 6
        and data.startswith(b"\\u00", pos - 6)
        and data[pos - 2 : pos].lower() == b"%02x" % c
    ):
        return 6
    if c in _SHORT_ESCAPES and pos >= 2 and data[pos - 2 : pos] == bytes((0x5C, c)):
        return 2
    if pos >= 1 and data[pos - 1 : pos].lower() == bytes([c]).lower():
        return 1
    return 0


def _cut(data: bytes, spans: list[tuple[int, int]]) -> bytes:
    # Overlapping or touching spans (both anchors of one key) become one "[redacted]".
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    parts: list[bytes] = []
    last = 0
    for start, end in merged:
        parts.append(data[last:start])
        parts.append(REDACTED)
        last = end
    parts.append(data[last:])
    return b"".join(parts)
