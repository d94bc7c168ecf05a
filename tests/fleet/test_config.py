"""Settings: PALAUTE_ variables, and no default secret outside development."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fleet.cli import main
from fleet.config import DEV_SECRET, Settings


def test_environment_variables_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PALAUTE_DB_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("PALAUTE_MQTT_URL", "mqtt://ingest:pw@broker:1884")
    monkeypatch.setenv("PALAUTE_INGEST_BATCH_MAX", "500")
    settings = Settings()
    assert settings.db_url == "postgresql+psycopg://u@h/db"
    assert settings.mqtt_url == "mqtt://ingest:pw@broker:1884"
    assert settings.ingest_batch_max == 500


def test_production_refuses_the_default_secret() -> None:
    with pytest.raises(ValidationError, match="PALAUTE_SECRET_KEY"):
        Settings(environment="production", secret_key=DEV_SECRET)
    with pytest.raises(ValidationError, match="at least 32"):
        Settings(environment="production", secret_key="short")
    assert Settings(environment="production", secret_key="x" * 40).secret_key == "x" * 40
    assert Settings(environment="development").secret_key == DEV_SECRET


def test_cli_reports_invalid_settings_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PALAUTE_ENVIRONMENT", "production")
    monkeypatch.delenv("PALAUTE_SECRET_KEY", raising=False)
    with pytest.raises(SystemExit) as info:
        main(["db", "upgrade"])
    assert "invalid settings" in str(info.value) and "PALAUTE_SECRET_KEY" in str(info.value)
