"""``GET /playground``: a page to try the service in a browser (pick a language, edit the
code, run it, watch stdout and stderr stream in, then the status and timings).

The page is one self-contained file beside this module (playground.html: no asset from
anywhere else, so it works on a host without internet access and tells no third party
who opens it). It calls ``/languages`` and ``POST /execute`` with ``Accept:
text/event-stream`` like any client, with the API key typed into it when the gateway
has keys: the same access as everywhere. ``?language=…&code=…&run=1`` fills it in and
runs it at once (a link that shows a program running).
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

PAGE = resources.files(__package__).joinpath("playground.html")


def playground_routes() -> APIRouter:
    router = APIRouter()
    page = PAGE.read_text(encoding="utf-8")

    @router.get("/playground", include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    return router
