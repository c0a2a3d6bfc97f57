from __future__ import annotations

import pytest

from tokenhub_stream.asgi._admission import check_origin, client_address, parse_networks
from tokenhub_stream.asgi._body import outgoing_body, parse_body, parse_content_type, validate_body
from tokenhub_stream.asgi._limits import TokenBucket
from tokenhub_stream.asgi._wire import EventSplitter, ProxyRejection

STREAMS = [
    b'data: {"a":1}\n\ndata: {"b":2}\n\n: keep-alive\n\ndata: [DONE]\n\n',
    b'data: {"a":1}\r\n\r\ndata: {"b":2}\r\n\r\nevent: x\r\ndata: y\r\n\r\n',
    b"data: a\r\rdata: b\r\rdata: c\r\r",
    b"data: a\n\r\ndata: b\r\n\ndata: c\r\r\ndata: d\n\rdata: e\n\n",
]


def _boundaries(stream: bytes) -> set[int]:
    # Reference: tokenize terminators left to right, an empty line ends an event.
    ends: set[int] = set()
    i = 0
    line_empty = True
    while i < len(stream):
        c = stream[i : i + 1]
        if c in (b"\r", b"\n"):
            size = 2 if stream[i : i + 2] == b"\r\n" else 1
            i += size
            if line_empty:
                ends.add(i)
            line_empty = True
        else:
            line_empty = False
            i += 1
    return ends


@pytest.mark.parametrize("stream", STREAMS)
def test_event_splitter_every_split_point(stream: bytes) -> None:
    expected = _boundaries(stream)
    for cut in range(len(stream) + 1):
        for second in range(cut, len(stream) + 1):
            splitter = EventSplitter()
            sent = b""
            for piece in (stream[:cut], stream[cut:second], stream[second:]):
                out = splitter.feed(piece)
                sent += out
                # Whatever was forwarded ends at an event boundary.
                assert not sent or len(sent) in expected
                assert len(splitter.pending) <= len(stream) - len(sent)
            sent += splitter.flush()
            assert sent == stream


def test_event_splitter_holds_one_incomplete_event() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: one\n\ndata: tw") == b"data: one\n\n"
    assert splitter.pending == b"data: tw"
    assert splitter.feed(b"o\n") == b""
    assert splitter.feed(b"\n") == b"data: two\n\n"
    assert splitter.feed(b"data: x\n\r") == b""  # a trailing CR may start a CRLF
    assert splitter.feed(b"\n") == b"data: x\n\r\n"


def test_event_splitter_large_event_is_linear() -> None:
    splitter = EventSplitter()
    piece = b"x" * 1000
    assert splitter.feed(b"data: ") == b""
    for _ in range(2000):
        assert splitter.feed(piece) == b""
    out = splitter.feed(b"\n\n")
    assert len(out) == 6 + 2000 * 1000 + 2


@pytest.mark.parametrize(
    ("value", "charset"),
    [
        (None, "utf-8"),
        ("application/json", "utf-8"),
        ("text/plain;charset=UTF-8", "utf-8"),
        ('text/plain; charset="UTF8"', "utf-8"),
        ("Application/JSON; charset=utf-8", "utf-8"),
    ],
)
def test_parse_content_type_accepts(value: str | None, charset: str) -> None:
    assert parse_content_type(value) == charset


@pytest.mark.parametrize(
    "value",
    [
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/html",
        'text/plain; charset="iso-8859-1"',  # UTF-8 only (#14)
    ],
)
def test_parse_content_type_rejects_415(value: str) -> None:
    with pytest.raises(ProxyRejection) as info:
        parse_content_type(value)
    assert info.value.status == 415


@pytest.mark.parametrize("raw", [b"{", b"[1]", b'"x"', b"\xff\xfe{}"])
def test_parse_body_rejects_400(raw: bytes) -> None:
    with pytest.raises(ProxyRejection) as info:
        parse_body(raw, "utf-8")
    assert info.value.status == 400


def _validate(body: dict[str, object], **kw: object) -> tuple[dict[str, object], bool]:
    options: dict[str, object] = {
        "default_model": "m-default",
        "allowed_models": None,
        "max_tokens_cap": 100,
    }
    options.update(kw)
    return validate_body(body, **options)  # type: ignore[arg-type]


MSG = [{"role": "user", "content": "hi"}]


def test_validate_body_defaults_model_and_stream() -> None:
    body, stream = _validate({"messages": MSG})
    assert body["model"] == "m-default"
    assert stream is True
    assert _validate({"messages": MSG, "stream": False})[1] is False


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"messages": []},
        {"messages": "hi"},
        {"messages": [{"content": "x"}]},
        {"messages": ["x"]},
        {"messages": MSG, "model": 3},
        {"messages": MSG, "stream": "yes"},
        {"messages": MSG, "max_tokens": -1},
        {"messages": MSG, "max_tokens": 1.5},
        {"messages": MSG, "max_completion_tokens": "10"},
        {"messages": MSG, "max_tokens": True},
    ],
)
def test_validate_body_rejects_400(body: dict[str, object]) -> None:
    with pytest.raises(ProxyRejection) as info:
        _validate(body)
    assert info.value.status == 400


def test_validate_body_model_allow_list() -> None:
    with pytest.raises(ProxyRejection) as info:
        _validate({"messages": MSG, "model": "expensive"}, allowed_models={"cheap"})
    assert info.value.status == 400
    assert _validate({"messages": MSG, "model": "cheap"}, allowed_models={"cheap"})[0]["model"]


def test_validate_body_clamps_tokens() -> None:
    body, _ = _validate({"messages": MSG, "max_tokens": 5000, "max_completion_tokens": 50})
    assert body["max_tokens"] == 100
    assert body["max_completion_tokens"] == 50


def test_outgoing_body_allow_list() -> None:
    raw = outgoing_body(
        {"messages": MSG, "model": "m", "api_base": "http://evil", "stream_options": {}},
        {"messages", "model", "stream_options"},
        False,
    )
    assert raw == b'{"messages":[{"role":"user","content":"hi"}],"model":"m","stream":false}'


@pytest.mark.parametrize(
    ("headers", "host", "allowed", "ok"),
    [
        ({}, "app.example", None, True),
        ({"sec-fetch-site": "same-origin"}, "app.example", None, True),
        ({"sec-fetch-site": "cross-site"}, "app.example", None, False),
        ({"origin": "https://app.example"}, "app.example", None, True),
        ({"origin": "https://app.example:443"}, "app.example", None, True),
        ({"origin": "http://localhost:8000"}, "localhost:8000", None, True),
        ({"origin": "https://evil.example"}, "app.example", None, False),
        ({"origin": "null"}, "app.example", None, False),
        ({"origin": "https://app.example"}, None, None, False),
        (
            {"origin": "https://other.example"},
            "app.example",
            frozenset({"https://other.example"}),
            True,
        ),
        (
            {"origin": "https://app.example"},
            "app.example",
            frozenset({"https://other.example"}),
            False,
        ),
        ({"origin": "https://any.example"}, "app.example", frozenset({"*"}), True),
    ],
)
def test_check_origin(
    headers: dict[str, str], host: str | None, allowed: frozenset[str] | None, ok: bool
) -> None:
    if ok:
        check_origin(headers, own_host=host, allowed_origins=allowed)
    else:
        with pytest.raises(ProxyRejection) as info:
            check_origin(headers, own_host=host, allowed_origins=allowed)
        assert info.value.status == 403


def test_client_address_trusts_only_configured_proxies() -> None:
    nets = parse_networks(["10.0.0.0/8"])
    assert client_address("1.2.3.4", "9.9.9.9", nets) == "1.2.3.4"
    assert client_address("10.0.0.1", "9.9.9.9, 10.0.0.2", nets) == "9.9.9.9"
    assert client_address("10.0.0.1", "6.6.6.6, 9.9.9.9", nets) == "9.9.9.9"
    assert client_address("10.0.0.1", None, nets) == "10.0.0.1"


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=0.5, burst=2, max_keys=2)
    assert bucket.take("a", now=0.0) is None
    assert bucket.take("a", now=0.0) is None
    assert bucket.take("a", now=0.0) == 2
    assert bucket.take("a", now=2.0) is None
    assert bucket.take("b", now=2.0) is None
    assert bucket.take("c", now=2.0) is None  # evicts "a"
    assert bucket.take("a", now=2.0) is None
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, max_keys=1)
