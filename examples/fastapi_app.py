"""FastAPI app that mounts the key-hiding chat proxy at POST /api/chat, with auth and rate limits.

Run (inside the project's virtualenv, with `pip install fastapi`):

    TOKENHUB_KEY=sk-... python examples/fastapi_app.py

    curl -N http://127.0.0.1:8000/api/chat -H "Authorization: Bearer demo-token" \
         -d '{"messages": [{"role": "user", "content": "Hello"}]}'

The proxy also speaks OpenAI: it is mounted a second time at /v1/chat/completions, so
`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="demo-token")` streams through it.

Environment: TOKENHUB_KEY (required), TOKENHUB_BASE_URL (optional upstream),
APP_TOKENS (comma-separated bearer tokens, default "demo-token").
"""

from __future__ import annotations

import hmac
import os

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request

from tokenhub_stream.asgi import ChatProxy, InMemoryRateLimiter

TOKENS = {t.strip() for t in os.environ.get("APP_TOKENS", "demo-token").split(",") if t.strip()}


async def authorize(request: Request) -> str | None:
    token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not token:
        return None  # 401
    if not any(hmac.compare_digest(token, t) for t in TOKENS):
        raise HTTPException(403, "Unknown token.")
    return f"token:{token[:4]}"


async def add_system_prompt(request: Request, body: dict[str, object]) -> dict[str, object]:
    messages = body["messages"]
    assert isinstance(messages, list)
    return {**body, "messages": [{"role": "system", "content": "Be concise."}, *messages]}


proxy = ChatProxy(
    api_key=os.environ["TOKENHUB_KEY"],
    base_url=os.environ.get("TOKENHUB_BASE_URL") or None,
    authorize=authorize,
    rate_limiter=InMemoryRateLimiter(rate=1 / 6, burst=10),
    on_request=add_system_prompt,
)

# Middleware rather than app.mount(): a mount answers POST /api/chat with a 307 to
# /api/chat/. The second serves the openai SDK (base_url=".../v1").
app = FastAPI(
    middleware=[proxy.middleware("/api/chat"), proxy.middleware("/v1/chat/completions")],
    lifespan=proxy.lifespan,
)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


if __name__ == "__main__":
    import gc

    import uvicorn

    gc.freeze()  # full collections skip what is loaded by now (docs/deployment.md)
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
