"""Every setting of chat-gateway, read once from the environment (and `.env`) into one object.

The names and defaults are those of the README's settings tables; the tuning knobs are marked
"extra" and documented in the README. Nothing else in the code reads `os.environ`.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from middleware.access import parse_allowed
from middleware.detectors import DEFAULT_RULES_FILE

DETECTORS = ("openai", "rules", "guard", "azure")
# A client key named after its application: `app-a:KEY` (a name of letters, digits, - and _).
_NAMED_KEY = re.compile(r"([A-Za-z0-9_-]{1,64}):(.+)", re.DOTALL)


# What each detector cannot run without, and what to set it to.
_DETECTOR_SETTINGS = {
    "guard": ("guard_url", "guard_model"),
    "azure": ("azure_content_safety_url", "azure_content_safety_key"),
}
_DETECTOR_NEEDS = {
    "guard_url": "the base URL of the OpenAI-compatible chat endpoint serving the guard model, with its /v1",
    "guard_model": "the guard model's name at that endpoint, e.g. meta-llama/Llama-Guard-3-8B",
    "azure_content_safety_url": "the Content Safety resource's endpoint, https://<name>.cognitiveservices.azure.com",
    "azure_content_safety_key": "one of the Content Safety resource's keys",
}


class SettingsError(Exception):
    """A setting has a bad value; the message is one line naming the variable and why."""


def _env(name: str, default: Any = None) -> Any:
    # A setting read from a variable without the GATEWAY_ prefix. Tests and code build Settings
    # by field name; operators set the variable.
    return Field(default, validation_alias=AliasChoices(name, name.lower()))


def _split(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        frozen=True,
        # `OPENAI_API_KEY=` in a .env or compose file means unset, for every variable.
        env_ignore_empty=True,
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=256)
    upstream_url: str = "https://api.openai.com/v1"
    openai_api_key: SecretStr | None = _env("OPENAI_API_KEY")
    api_keys: Annotated[frozenset[SecretStr], NoDecode] = frozenset()
    database_url: SecretStr | None = _env("DATABASE_URL")
    data_dir: Path = Path(".gateway")
    user_header: str = "X-User-ID"
    max_strikes: int = Field(3, ge=1)
    block_seconds: float = Field(86400.0, gt=0)
    admin_token: SecretStr | None = None
    # `off`: /admin answers 503 admin_disabled whatever the token and the stored operators say
    # (pods that serve only /v1 set it: the operators live in the database they share).
    admin: bool = True
    moderation: Annotated[tuple[str, ...], NoDecode] = ("openai",)
    rules_file: Path = DEFAULT_RULES_FILE
    moderation_url: str | None = None
    moderation_failure: Literal["closed", "open"] = "closed"
    connect_timeout: float = Field(3.0, gt=0)
    read_timeout: float = Field(120.0, gt=0)
    max_body_bytes: int = Field(33554432, ge=1)
    store_failure: Literal["closed", "open"] = "closed"
    shutdown_grace: float = Field(30.0, ge=0)
    allow_open_relay: bool = False
    strike_window_seconds: float = Field(0.0, ge=0)
    block_escalation: float = Field(1.0, ge=1)
    max_block_seconds: float = Field(2592000.0, gt=0)
    permanent_after_blocks: int = Field(0, ge=0)
    enforcement: Literal["enforce", "shadow"] = "enforce"
    # The enforcement policy (TOML, gateway/policy.py); set, it replaces the six strike and block variables.
    policy_file: Path | None = None
    # How long after an event its user may appeal it; 0: no appeals.
    appeal_window_days: float = Field(180.0, ge=0, le=36500)
    # Audit events older than this are deleted (never one that still counts); 0: kept for good.
    event_retention_days: float = Field(365.0, ge=0, le=36500)
    moderation_thresholds: Annotated[dict[str, float], NoDecode] = Field(default_factory=dict)
    safety_identifier: Literal["off", "hash"] = "off"
    safety_salt: SecretStr | None = None
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # The second round's detectors (docs/DETECTORS.md) and how the detectors are run.
    moderation_mode: Literal["sequential", "parallel"] = "sequential"
    moderation_timing: Literal["before_call", "during_call"] = "before_call"
    pii: Literal["off", "mask", "block"] = "off"
    guard_url: str | None = None
    guard_model: str | None = None
    guard_api_key: SecretStr | None = None
    guard_timeout: float = Field(10.0, gt=0, allow_inf_nan=False)
    azure_content_safety_url: str | None = None
    azure_content_safety_key: SecretStr | None = None
    azure_severity: int = Field(4, ge=1, le=7)
    azure_timeout: float = Field(10.0, gt=0, allow_inf_nan=False)  # extra

    # extra: tuning knobs, in the README's second settings table.
    moderation_timeout: float = Field(10.0, gt=0)
    circuit_failures: int = Field(5, ge=1)
    circuit_cooldown: float = Field(30.0, gt=0)
    upstream_max_connections: int = Field(1000, ge=1)
    db_pool_size: int = Field(10, ge=1)
    db_statement_cache: bool = True
    listen_database_url: SecretStr | None = None
    # The upstream hop: `lean` (aiohttp's lower steps, checked at start-up) or `public` (session.request).
    upstream_hop: Literal["lean", "public"] = "lean"
    # Bounds (503 server_busy past them): how long a call waits for a free upstream connection,
    # how many of those one client address may hold (default: half of them; 0: no cap), and the
    # request-body bytes held in memory across calls (moderated bodies are read whole).
    upstream_queue_seconds: float = Field(1.0, ge=0)
    max_calls_per_client: int | None = Field(None, ge=0)
    max_buffered_bytes: int = Field(128 * 1024 * 1024, ge=1)
    # With named client keys (`app-a:KEY`): user ids are per application.
    users_per_app: bool = False
    # uvicorn's own variable: peers trusted to set X-Forwarded-For / X-Forwarded-Proto
    forwarded_allow_ips: str = _env("FORWARDED_ALLOW_IPS", "127.0.0.1")

    # extra: the server's limits on a request body (gateway/server.py): due `body_timeout`
    # seconds after its headers plus a second for each `body_min_rate` bytes received
    body_timeout: float = Field(20.0, gt=0, allow_inf_nan=False)
    body_min_rate: float = Field(500.0, ge=0, allow_inf_nan=False)

    # Judged routes (middleware/routes.py): a call holding parts no detector reads (audio, files,
    # images by file id, token ids) is forwarded, or refused with 400 unjudgeable_input.
    unjudgeable: Literal["forward", "refuse"] = "forward"
    # The key's reach (middleware/access.py): refused routes and headers the gateway's own key
    # carries after all (`realtime/calls,OpenAI-Project`); without OPENAI_API_KEY nothing is refused.
    allowed_routes: Annotated[tuple[str, ...], NoDecode] = ()
    # The moderator console (gateway/console): how long a sign-in lasts, in hours.
    console_session_hours: float = Field(8.0, gt=0, le=168, allow_inf_nan=False)

    # Output moderation (middleware/output.py): the model's answers judged too (`audit`), or held
    # back in windows of this many characters and cut when flagged (`block`).
    output_moderation: Literal["off", "audit", "block"] = "off"
    output_holdback_chars: int = Field(200, ge=1, le=100_000)
    # A flagged answer counts against the user who drew it out (points, blocks) instead of only being audited.
    output_strikes: bool = False

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, value: Any) -> Any:
        return frozenset(_split(value))

    @field_validator("moderation", mode="before")
    @classmethod
    def _parse_moderation(cls, value: Any) -> Any:
        items = [item.lower() for item in _split(value)]
        if items == ["off"]:
            return ()
        if "pii" in items:
            raise ValueError("pii is not listed here: set GATEWAY_PII=mask or GATEWAY_PII=block")
        unknown = [item for item in items if item not in DETECTORS]
        if unknown or not items:
            raise ValueError(f"expected a comma list of {', '.join(DETECTORS)}, or off; got {value!r}")
        return tuple(dict.fromkeys(items))

    @field_validator("moderation_thresholds", mode="before")
    @classmethod
    def _parse_thresholds(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        thresholds: dict[str, float] = {}
        for item in _split(value):
            category, sep, raw = item.partition("=")
            try:
                score = float(raw)
            except ValueError:
                score = math.nan
            if not sep or not category.strip() or not 0 <= score <= 1:
                raise ValueError(f"expected category=score with a score from 0 to 1, got {item!r}")
            thresholds[category.strip()] = score
        return thresholds

    @field_validator("upstream_url", "moderation_url", "webhook_url", "guard_url", "azure_content_safety_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        return value.rstrip("/")

    @field_validator("user_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not value or not all(c.isalnum() or c in "-_" for c in value):
            raise ValueError(f"expected an HTTP header name, got {value!r}")
        return value

    @field_validator("allowed_routes", mode="before")
    @classmethod
    def _parse_allowed_routes(cls, value: Any) -> Any:
        return parse_allowed(value) if isinstance(value, str | list | tuple) else value

    @field_validator(
        "log_level",
        "log_format",
        "enforcement",
        "safety_identifier",
        "moderation_mode",
        "moderation_timing",
        "pii",
        "unjudgeable",
        "output_moderation",
        mode="before",
    )
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        if self.safety_identifier == "hash" and not self.safety_salt:
            raise ValueError("GATEWAY_SAFETY_SALT is required when GATEWAY_SAFETY_IDENTIFIER=hash")
        for detector, needed in _DETECTOR_SETTINGS.items():
            missing = [name for name in needed if detector in self.moderation and getattr(self, name) is None]
            if missing:
                raise ValueError(
                    f"{variable_name(missing[0])} is required when GATEWAY_MODERATION includes {detector} "
                    f"({_DETECTOR_NEEDS[missing[0]]})"
                )
        if self.webhook_url and not self.webhook_secret:
            raise ValueError("GATEWAY_WEBHOOK_SECRET is required when GATEWAY_WEBHOOK_URL is set")
        if self.users_per_app and (not self.api_keys or None in self.client_keys.values()):
            raise ValueError(
                "GATEWAY_USERS_PER_APP=true needs every key of GATEWAY_API_KEYS named after its application "
                "(app-a:KEY,app-b:KEY)"
            )
        if 0 < self.event_retention_days < self.appeal_window_days:
            raise ValueError(
                f"GATEWAY_EVENT_RETENTION_DAYS ({self.event_retention_days:g}) is shorter than "
                f"GATEWAY_APPEAL_WINDOW_DAYS ({self.appeal_window_days:g}): events would be deleted while their "
                "users may still appeal them; lengthen the retention or shorten the appeal window"
            )
        if self.output_moderation != "off" and not self.moderation:
            raise ValueError(
                f"GATEWAY_OUTPUT_MODERATION={self.output_moderation} needs a detector to judge answers with, "
                "and GATEWAY_MODERATION is off"
            )
        if self.max_buffered_bytes < self.max_body_bytes:
            raise ValueError(
                f"GATEWAY_MAX_BUFFERED_BYTES ({self.max_buffered_bytes}) must be at least "
                f"GATEWAY_MAX_BODY_BYTES ({self.max_body_bytes}), or no body that large could ever be judged"
            )
        return self

    @property
    def moderation_base_url(self) -> str:
        return self.moderation_url or self.upstream_url

    @property
    def client_keys(self) -> dict[str, str | None]:
        """Each client key with the name of its application (`app-a:KEY`), None when unnamed."""
        keys: dict[str, str | None] = {}
        for secret in self.api_keys:
            named = _NAMED_KEY.fullmatch(secret.get_secret_value())
            if named is None:
                keys[secret.get_secret_value()] = None
            else:
                keys[named.group(2)] = named.group(1)
        return keys

    @property
    def calls_per_client(self) -> int:
        """Upstream calls one client address may hold at once; 0: no cap."""
        if self.max_calls_per_client is not None:
            return self.max_calls_per_client
        return max(1, self.upstream_max_connections // 2)

    def is_trusted_proxy(self, address: str) -> bool:
        """Whether FORWARDED_ALLOW_IPS trusts `address` (a proxy that speaks for many clients)."""
        return _trusts(self.forwarded_allow_ips, address)

    @property
    def user_header_key(self) -> bytes:
        """The user header as it appears in an ASGI scope: lower-case latin-1 bytes."""
        return self.user_header.lower().encode("latin-1")

    def open_relay_problem(self) -> str | None:
        """Why this configuration would let anyone spend the OpenAI key, or None if it would not."""
        if self.openai_api_key is None or self.api_keys or self.allow_open_relay:
            return None
        if _is_loopback(self.host):
            return None
        return (
            f"GATEWAY_HOST={self.host} is reachable from other machines and OPENAI_API_KEY is set "
            "without GATEWAY_API_KEYS, so anyone could spend the key: set GATEWAY_API_KEYS, listen "
            "on 127.0.0.1, or set GATEWAY_ALLOW_OPEN_RELAY=true if a network policy guards it"
        )


@functools.lru_cache(maxsize=4096)
def _trusts(allowed: str, address: str) -> bool:
    # uvicorn's rules for FORWARDED_ALLOW_IPS: "*", addresses, networks, or other literal names.
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        ip = None
    for item in (part.strip() for part in allowed.split(",")):
        if item == "*" or item == address:
            return True
        if ip is not None and "/" in item:
            try:
                if ip in ipaddress.ip_network(item, strict=False):
                    return True
            except ValueError:
                continue
    return False


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _ArgumentsOnly(Settings):
    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def settings_from(**values: Any) -> Settings:
    """Settings from these values only: no environment variable, no `.env` (tests, the demo)."""
    return _ArgumentsOnly(**values)


def variable_name(field: str) -> str:
    """The environment variable of a Settings field (its own name when `_env` gave it one)."""
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"GATEWAY_{field.upper()}"


def load_settings(**overrides: Any) -> Settings:
    """Read the settings; a bad value raises SettingsError with one line for the operator."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        loc = [str(part) for part in error["loc"] if isinstance(part, str)]
        message = str(error["msg"]).removeprefix("Value error, ")
        if not loc:
            raise SettingsError(f"invalid settings: {message}") from None
        field = loc[0].lower()
        if field.startswith("gateway_"):
            field = field.removeprefix("gateway_")
        raw = error.get("input")
        shown = "" if "secret" in field or "key" in field or "token" in field or "url" in field else f" (got {raw!r})"
        if isinstance(raw, dict | list | tuple | frozenset) or repr(raw) in message:
            shown = ""
        raise SettingsError(f"{variable_name(field)}: {message}{shown}") from None
