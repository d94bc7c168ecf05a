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


def create_app(sessions: sessionmaker[Session], *, metrics: Metrics | None = None) -> FastAPI:
    """Build the API around a session factory; ``metrics`` adds ``/metrics`` when given."""
    app = FastAPI(title="Palaute fleet API", version=__version__,
                  description="Registry, ingest status and reports for feedback terminals.")
    app.state.sessions = sessions
    for module in (health, auth, users, customers, sites, devices, assignments, audit, stats,
                   reports, rollouts, selections):
        app.include_router(module.router, prefix="/api/v1")
    if metrics is not None:
        exported = metrics

        @app.get("/metrics", response_class=PlainTextResponse, include_in_schema=False)
        def prometheus() -> str:
            return exported.render()

    return app
