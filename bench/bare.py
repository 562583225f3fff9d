"""The tracker's baseline: bare Starlette endpoints answering the same bytes as the pixel and the redirect.

Same routes, same response bodies and headers, same uvicorn settings (`http_config`) and event
loop as `inflight tracker`, but no token check and no event stored: the ceiling the tracker is
measured against.

    python -m bench.bare --port 8081 --link https://shop.example.com/p/0
"""

from __future__ import annotations

import argparse

import uvicorn
import uvloop
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from inflight.service import bind, http_config
from tracker.app import NO_CACHE, PIXEL_GIF
from tracker.edge import HARDENING


def create_bare_app(link: str) -> Starlette:
    headers = {**NO_CACHE, **{name.decode(): value.decode() for name, value in HARDENING}}

    async def pixel(request: Request) -> Response:
        return Response(PIXEL_GIF, media_type="image/gif", headers=headers)

    async def click(request: Request) -> Response:
        return RedirectResponse(link, status_code=302, headers=headers)

    return Starlette(routes=[Route("/o/{token}", pixel, methods=["GET", "HEAD"]),
                             Route("/c/{token}", click, methods=["GET", "HEAD"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--link", required=True, help="where /c/... redirects (the link signed in the tokens)")
    args = parser.parse_args()
    server = uvicorn.Server(http_config(create_bare_app(args.link)))
    uvloop.run(server.serve(sockets=[bind(f"127.0.0.1:{args.port}")]))


if __name__ == "__main__":
    main()
