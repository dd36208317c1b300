"""The /v1 routes, one module per area; each exposes ``router``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from continual.api.context import AppContext


def context(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


# A route parameter ``ctx: Ctx`` receives the app's context.
Ctx = Annotated[AppContext, Depends(context)]
