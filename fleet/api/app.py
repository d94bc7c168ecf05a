"""Application factory for the fleet API."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from sqlalchemy.orm import Session, sessionmaker

from fleet import __version__
from fleet.api.routes import (
    assignments,
    audit,
    auth,
    content,
    customers,
    devices,
    health,
    reports,
    rollouts,
    selections,
    sites,
    stats,
    users,
)
from fleet.ingest.metrics import Metrics


def create_app(sessions: sessionmaker[Session], *, metrics: Metrics | None = None,
               content_key_file: str = "") -> FastAPI:
    """Build the API around a session factory; ``metrics`` adds ``/metrics`` when given.

    ``content_key_file`` names the key that signs new content versions (creating content
    answers 503 without one).
    """
    app = FastAPI(title="Palaute fleet API", version=__version__,
                  description="Registry, ingest status and reports for feedback terminals.")
    app.state.sessions = sessions
    app.state.content_key_file = content_key_file
    for module in (health, auth, users, customers, sites, devices, assignments, audit, stats,
                   reports, content, rollouts, selections):
        app.include_router(module.router, prefix="/api/v1")
    if metrics is not None:
        exported = metrics

        @app.get("/metrics", response_class=PlainTextResponse, include_in_schema=False)
        def prometheus() -> str:
            return exported.render()

    return app
