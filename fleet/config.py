"""Fleet settings: one pydantic-settings class, every field from a ``PALAUTE_`` variable."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleet.mqtt_url import parse_mqtt_url

# The only secret with a default.  It is fine on a developer's laptop and refused anywhere else.
DEV_SECRET = "palaute-development-secret-change-me"


class Settings(BaseSettings):
    """Configuration of the fleet service, ingest workers and CLI.

    Every field can be set with an environment variable of the same name prefixed ``PALAUTE_``
    (``PALAUTE_DB_URL``, ``PALAUTE_MQTT_URL`` ...) or in a ``.env`` file.
    """

    model_config = SettingsConfigDict(env_prefix="PALAUTE_", env_file=".env", extra="ignore")

    environment: Literal["development", "test", "production"] = "development"
    secret_key: str = DEV_SECRET

    db_url: str = "sqlite:///palaute.db"
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    mqtt_client_id: str = "palaute-ingest"
    # MQTT 5 lets the broker keep many deliveries in flight to a worker (Receive Maximum);
    # 3.1.1 is for brokers that speak nothing newer, such as the demo's embedded broker.
    mqtt_protocol: Literal["5", "3.1.1"] = "5"
    topic_root: str = "fb/v1"
    # Workers in the same group share one MQTT shared subscription; empty disables sharing
    # (needed for brokers without $share support, such as the demo's embedded broker).
    ingest_shared_group: str = "palaute-ingest"
    ingest_batch_max: int = Field(default=2000, ge=1)
    ingest_batch_wait_ms: int = Field(default=20, ge=0)
    # Writer threads of one worker, each with its own database connection; devices are
    # split between them by a hash of their id (docs/performance.md).
    ingest_writers: int = Field(default=2, ge=1, le=16)
    # Worker processes `palaute ingest` starts and supervises (one core each at most: the
    # interpreter lock); they share the load through the shared subscription.
    ingest_processes: int = Field(default=1, ge=1, le=64)
    ingest_max_payload: int = Field(default=16_384, ge=256)
    ingest_max_future_ms: int = Field(default=24 * 3600 * 1000, ge=0)
    # Terminals report health this often; one silent for 3x as long is marked offline.
    health_interval_s: int = Field(default=300, ge=1)
    # `palaute ingest` serves /metrics and /healthz here (0: off).
    metrics_port: int = Field(default=0, ge=0, le=65535)

    # Device broker accounts (Mosquitto dynamic-security), made by provisioning: the admin
    # account's URL, ``mqtt://palaute-admin:PW@host:port``.  Empty: provisioning answers 503.
    broker_admin_url: str = ""
    # Seconds to wait for the broker to answer one account command.
    broker_timeout_s: float = Field(default=5.0, gt=0, le=60)
    # The broker address written into a provisioned device's config.json; empty: the host
    # and port of ``mqtt_url`` (devices often reach the broker by another name than the fleet).
    device_mqtt_host: str = ""
    device_mqtt_port: int = Field(default=0, ge=0, le=65535)

    influx_url: str = ""
    influx_token: str = ""
    influx_org: str = "palaute"
    influx_bucket: str = "palaute"

    # Raw 32-byte Ed25519 seed (mode 0600) that signs content packages; terminals hold its
    # public key.  `palaute content keygen --out FILE` makes one (docs/content.md).
    content_key_file: str = ""

    # `palaute rollout run` advances rollouts this often (docs/operations.md).
    rollout_tick_s: float = Field(default=5.0, gt=0, le=3600)

    api_host: str = "127.0.0.1"
    api_port: int = 8000

    # `palaute provision`, on the installer's laptop: the fleet API and an installer's token.
    fleet_url: str = "http://127.0.0.1:8000"
    installer_token: str = ""

    @field_validator("broker_admin_url")
    @classmethod
    def _check_broker_admin_url(cls, value: str) -> str:
        # Refused at start-up rather than at the first provisioning.
        if value:
            target = parse_mqtt_url(value)
            if not target.username or not target.password:
                raise ValueError("must name the dynamic-security admin and its password: "
                                 "mqtt://palaute-admin:PASSWORD@host:1883")
        return value

    @model_validator(mode="after")
    def _refuse_default_secret(self) -> Settings:
        # A production fleet signing tokens with a published default secret is open to anyone.
        if self.environment == "production" and self.secret_key == DEV_SECRET:
            raise ValueError(
                "PALAUTE_SECRET_KEY is the development default; set a long random value "
                "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`) "
                "before running with PALAUTE_ENVIRONMENT=production"
            )
        if self.environment == "production" and len(self.secret_key) < 32:
            raise ValueError("PALAUTE_SECRET_KEY must be at least 32 characters in production")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
