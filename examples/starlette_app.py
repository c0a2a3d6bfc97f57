"""Starlette app that mounts the key-hiding chat proxy at POST /api/chat, with auth and rate limits.

Run (inside the project's virtualenv):

    TOKENHUB_KEY=sk-... python examples/starlette_app.py

Then open http://127.0.0.1:8000/ (the page gets a session cookie), or from a shell:

    curl -N http://127.0.0.1:8000/api/chat -H "Authorization: Bearer demo-token" \
         -d '{"messages": [{"role": "user", "content": "Hello"}]}'

Environment: TOKENHUB_KEY (required), TOKENHUB_BASE_URL (optional upstream),
APP_TOKENS (comma-separated bearer tokens, default "demo-token").
"""

from __future__ import annotations

import hmac
import os
import secrets

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from tokenhub_stream.asgi import ChatProxy, InMemoryRateLimiter

TOKENS = {t.strip() for t in os.environ.get("APP_TOKENS", "demo-token").split(",") if t.strip()}
SESSION = secrets.token_urlsafe(24)  # a stand-in for your real session store

PAGE = """<!doctype html><meta charset="utf-8"><title>chat</title>
<input id="q" value="Tell me a joke" size="60"><button id="go">Send</button><pre id="out"></pre>
<script>
document.getElementById("go").onclick = async () => {
  const out = document.getElementById("out"); out.textContent = "";
  const body = JSON.stringify({messages: [{role: "user", content: q.value}]});
  const res = await fetch("/api/chat", {method: "POST", body});  // text/plain: no preflight
  if (!res.ok) { out.textContent = (await res.json()).error.message; return; }
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read(); if (done) break;
    buf += value; const events = buf.split("\\n\\n"); buf = events.pop();
    for (const ev of events) {
      const lines = ev.split("\\n").filter(l => l.startsWith("data: "));
      const data = lines.map(l => l.slice(6)).join("\\n");
      if (!data || data === "[DONE]") continue;
      const obj = JSON.parse(data);
      if (obj.error) { out.textContent += "\\n[error: " + obj.error.message + "]"; return; }
      out.textContent += obj.choices?.[0]?.delta?.content ?? "";
    }
  }
};
</script>"""


def authorize(request: Request) -> str | None:
    """A bearer token (API clients) or the page's session cookie (the browser)."""
    auth = request.headers.get("authorization", "")
    token = auth.removeprefix("Bearer ").strip()
    if token and any(hmac.compare_digest(token, t) for t in TOKENS):
        return f"token:{token[:4]}"
    if hmac.compare_digest(request.cookies.get("session", ""), SESSION):
        return "browser-session"
    return None


async def homepage(request: Request) -> HTMLResponse:
    response = HTMLResponse(PAGE)
    response.set_cookie("session", SESSION, httponly=True, samesite="strict")
    return response


proxy = ChatProxy(
    api_key=os.environ["TOKENHUB_KEY"],
    base_url=os.environ.get("TOKENHUB_BASE_URL") or None,
    authorize=authorize,
    rate_limiter=InMemoryRateLimiter(rate=1 / 6, burst=10),  # 10 at once, then 10 a minute
    max_tokens_cap=1024,
)

app = Starlette(
    routes=[Route("/", homepage)],
    # Ahead of routing: POST /api/chat and GET /api/chat/models (docs/proxy.md).
    middleware=[proxy.middleware("/api/chat")],
    lifespan=proxy.lifespan,
)

if __name__ == "__main__":
    import gc

    import uvicorn

    gc.freeze()  # full collections skip what is loaded by now (docs/deployment.md)
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
