"""The baseline for `bench --intake`: a bare Starlette endpoint that reads the body and
answers like our webhook, served by the same uvicorn settings, so the ratio between the
two is what our intake's work (auth, parsing, a durable write, the buffer) costs."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def webhook(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse({"status": "stored"})


app = Starlette(routes=[Route("/webhook/evolution", webhook, methods=["POST"])])
