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
    provisioning,
    reports,
    rollouts,
    selections,
    sites,
    stats,
    users,
)
from fleet.broker.accounts import DeviceAccounts
from fleet.config import Settings, get_settings
from fleet.ingest.metrics import Metrics


def create_app(sessions: sessionmaker[Session], *, metrics: Metrics | None = None,
               settings: Settings | None = None,
               device_accounts: DeviceAccounts | None = None,
               content_key_file: str | None = None) -> FastAPI:
    """Build the API around a session factory; ``metrics`` adds ``/metrics`` when given.

    ``settings`` default to the process's; ``device_accounts`` default to the broker named by
    ``settings.broker_admin_url`` (none if it is empty: provisioning then answers 503);
    ``content_key_file`` (default ``settings.content_key_file``) names the key that signs new
    content versions and whose public half provisioning gives terminals.
    """
    settings = settings or get_settings()
    if device_accounts is None and settings.broker_admin_url:
        from fleet.broker.dynsec import DynsecAccounts

        device_accounts = DynsecAccounts(settings.broker_admin_url,
                                         topic_root=settings.topic_root,
                                         timeout=settings.broker_timeout_s)
    app = FastAPI(title="Palaute fleet API", version=__version__,
                  description="Registry, ingest status and reports for feedback terminals.")
    app.state.sessions = sessions
    app.state.settings = settings
    app.state.device_accounts = device_accounts
    app.state.content_key_file = (settings.content_key_file if content_key_file is None
                                  else content_key_file)
    for module in (health, auth, users, customers, sites, devices, provisioning, assignments,
                   audit, stats, reports, content, rollouts, selections):
        app.include_router(module.router, prefix="/api/v1")
    if metrics is not None:
        exported = metrics

        @app.get("/metrics", response_class=PlainTextResponse, include_in_schema=False)
        def prometheus() -> str:
            return exported.render()

    return app
