"""The template fast path in bulk: the contents of a network read's chunks, each the last
plain content chunk again but for its content, in a few C calls for the whole read.

`ChunkParser` learns a *template* from a plain content chunk, `prefix + literal + suffix`
around its content's JSON string literal (`ChunkParser._learn_template`): a later chunk
that is `prefix + another literal + suffix` is the same event with that content. Chunk by
chunk that takes a slice, a decode and a `scanstring` per chunk, in a Python loop
(about 340 ns a chunk on the project's machine). `bulk_contents` checks and decodes a
whole run of such chunks with one slice per chunk (`map`), two joins, one comparison and
one decode (about 130 ns a chunk in reads of 300 chunks, 175 in reads of 64; see
docs/design.md).

Why it is exact: each literal is its chunk without `len(prefix)` bytes in front and
`len(suffix)` behind. If the chunks joined equal `prefix`, the literals joined by
`suffix + prefix`, and `suffix`, byte for byte, every chunk is `prefix + its literal +
suffix`: the lengths line up chunk by chunk (a chunk shorter than both ends gives an empty
literal and a longer total, which cannot compare equal). What is left is that each literal
is one JSON string body, valid UTF-8, and decodes as `scanstring` decodes it, which the
checks below establish before anything is returned; anything else returns None and the
caller takes the chunk-by-chunk path, which decides (or reports) each chunk as before.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from operator import itemgetter, length_hint

__all__ = ["bulk_contents", "scanstring", "template_loop"]

# The C string scanner `json.loads` itself uses (`json.decoder.scanstring`, missing from
# typeshed): (text after an opening quote, 0) -> (decoded string, index after its
# closing quote); ValueError on a control character or a bad escape, as json.loads.
scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]

# A literal joined with others by NUL needs the JSON decoder when it holds a quote, a
# backslash or a control character (a NUL in it shows as one literal too many).
_NOT_PLAIN = re.compile('["\\\\\x01-\x1f]')
# One JSON string body (RFC 8259: no quote, backslash or control character but escaped).
_BODY = r'(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*'
# String bodies joined by NUL, which a body cannot hold.
_BODIES = re.compile(f"{_BODY}(?:\x00{_BODY})*")


def bulk_contents(
    prefix: bytes,
    suffix: bytes,
    chunks: Sequence[bytes],
    max_chunk_bytes: int,
    u_escapes: bool,
) -> list[str] | None:
    """The content of every chunk of `chunks` (empty ones left out), if each chunk is
    `prefix + literal + suffix` with a JSON string body as its literal; else None.

    Args:
        prefix: the template's bytes before the content's literal (its opening quote too).
        suffix: the template's bytes after the literal (its closing quote too).
        chunks: one or more chunk bodies.
        max_chunk_bytes: None if any chunk is longer.
        u_escapes: False to return None when a literal has a `\\u` escape (the orjson
            backend decodes those in full, see `_chunks._TEMPLATE_U_ESCAPES`).
    """
    head = len(prefix)
    literals = list(map(itemgetter(slice(head, -len(suffix))), chunks))
    middle = (suffix + prefix).join(literals)
    joined = b"".join(chunks)
    if (
        len(joined) != head + len(middle) + len(suffix)
        or not joined.startswith(prefix)
        or not joined.startswith(middle, head)
        or not joined.endswith(suffix)
        or (len(joined) > max_chunk_bytes and max(map(len, chunks)) > max_chunk_bytes)
    ):
        return None
    try:
        text = b"\x00".join(literals).decode()
    except UnicodeDecodeError:  # invalid UTF-8 somewhere: the chunk's own path reports it
        return None
    contents: list[str]
    if _NOT_PLAIN.search(text) is None:
        contents = text.split("\x00")
    elif (not u_escapes and "\\u" in text) or _BODIES.fullmatch(text) is None:
        return None
    else:
        # Valid bodies, so this array holds exactly them, decoded by the same scanner.
        contents = json.loads('["' + text.replace("\x00", '","') + '"]')
    if len(contents) != len(literals):  # a NUL inside a literal: not a valid body
        return None
    if "" in contents:
        return [content for content in contents if content]
    return contents


def template_loop(
    prefix: bytes,
    suffix: bytes,
    chunks: Sequence[bytes],
    start: int,
    out: list[str],
    max_chunk_bytes: int,
    u_escapes: bool,
) -> int:
    """Append to `out` the content of each chunk from `chunks[start]` that is `prefix +
    literal + suffix` (the contents `bulk_contents` would give), up to the first chunk that
    is not; return its index (`len(chunks)` if every one was)."""
    head = len(prefix)
    tail = len(suffix) - 1  # the closing quote stays with the literal
    append = out.append
    todo = iter(chunks if start == 0 else chunks[start:])
    refused = 1  # the chunk the loop stopped at stays, with those after it
    for chunk in todo:
        size = len(chunk)
        if not (chunk.startswith(prefix) and chunk.endswith(suffix)) or size > max_chunk_bytes:
            break
        stop = size - tail
        if stop <= head:
            break
        try:
            literal = chunk[head:stop].decode()
            content, closed = scanstring(literal, 0)
        except ValueError:  # invalid UTF-8, a control character, a bad escape
            break  # the chunk's own path reports it, or decodes it as the spec says
        if closed != len(literal) or not (u_escapes or "\\u" not in literal):
            break
        if content:
            append(content)
    else:
        refused = 0
    return len(chunks) - length_hint(todo) - refused
