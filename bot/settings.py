"""Settings: one frozen object built once from the environment, then `.env`, then defaults.

Nothing else in the package reads ``os.environ``. A bad value raises `SettingsError` naming
the variable; the CLI turns that into one clear line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

_RATE_RE = re.compile(r"^\s*([0-9]+)\s*/\s*(second|minute|hour)\s*$")
# A bearer key: RFC 6750's token68 alphabet, so a header with any other byte never matches.
_KEY_RE = re.compile(r"[A-Za-z0-9._~+/-]+=*")
# A key's user_id prefix: the user_id alphabet (contract.md), never "=".
_PREFIX_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# A Redis the runner starts itself is bounded; past it, writes fail (the replicas answer 503)
# and nothing stored is evicted: prefs, idempotency records and the outbox must survive.
DEFAULT_REDIS_MAXMEMORY = "256mb"
_REDIS_MEMORY_RE = re.compile(r"[1-9][0-9]{0,12}(kb|mb|gb)?", re.IGNORECASE)
_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}


class SettingsError(ValueError):
    """A setting has a value the stack cannot run with."""

    def __init__(self, name: str, value: str, why: str) -> None:
        super().__init__(f"invalid setting {name}={value!r}: {why}")
        self.name = name


@dataclass(frozen=True, slots=True)
class Rate:
    """A sustained rate: `count` events per `period` seconds."""

    count: int
    period: float

    @property
    def interval(self) -> float:
        """Seconds between two events at the sustained rate (GCRA's emission interval)."""
        return self.period / self.count

    def __str__(self) -> str:
        unit = {v: k for k, v in _PERIODS.items()}[self.period]
        return f"{self.count}/{unit}"


def parse_rate(text: str) -> Rate:
    """Parse ``N/second|minute|hour``."""
    m = _RATE_RE.match(text)
    if not m or int(m.group(1)) < 1:
        raise ValueError("expected N/second, N/minute or N/hour with N >= 1")
    return Rate(int(m.group(1)), _PERIODS[m.group(2)])


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One bearer key of `BOT_API_KEYS`, limited to users starting `prefix` when it is set.

    `digest` (SHA-256 of the key) is what requests are compared against: equal lengths, so
    the comparison takes the same time whatever was presented.
    """

    key: str = dataclasses.field(repr=False)  # a secret: never in a repr, hence a log line
    prefix: str = ""
    digest: bytes = dataclasses.field(init=False, repr=False, compare=False)
    ident: str = dataclasses.field(init=False, compare=False)  # its name in Redis; not secret

    def __post_init__(self) -> None:
        digest = hashlib.sha256(self.key.encode()).digest()
        object.__setattr__(self, "digest", digest)
        object.__setattr__(self, "ident", digest.hex()[:16])

    def allows(self, user_id: str) -> bool:
        return user_id.startswith(self.prefix)


def parse_api_keys(text: str) -> tuple[ApiKey, ...]:
    """``k1,k2=tg:``: comma-separated keys, each optionally ``=PREFIX`` (a user_id prefix).

    The split is at the last ``=`` followed by a valid prefix, so base64 keys that end in
    ``=`` padding stay whole (``abc==`` is a key; ``abc===tg:`` is ``abc==`` for ``tg:``).
    """
    keys: list[ApiKey] = []
    for item in (k.strip() for k in text.split(",")):
        if not item:
            continue
        key, sep, prefix = item.rpartition("=")
        if not (sep and key and _PREFIX_RE.fullmatch(prefix)):
            key, prefix = item, ""
        if not _KEY_RE.fullmatch(key):
            raise ValueError("keys are characters of A-Z a-z 0-9 . _ ~ + / - (then = padding)")
        keys.append(ApiKey(key, prefix))
    if len({k.key for k in keys}) != len(keys):
        raise ValueError("a key is listed twice")
    return tuple(keys)


def parse_networks(text: str) -> tuple[IpNetwork, ...]:
    """Comma-separated addresses or CIDR networks (``10.0.0.0/8,fd00::/8``)."""
    return tuple(
        ipaddress.ip_network(item.strip(), strict=False) for item in text.split(",") if item.strip()
    )


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of the stack, named as in contract.md (plus a few of our own)."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    upstream_url: str = "http://127.0.0.1:8099"
    upstream_kind: str = "stub"  # stub | openai
    upstream_model: str = "gpt-4o-mini"
    upstream_api_key: str = ""
    # LLM upstream (UPSTREAM_KIND=openai): docs/upstream.md. Models a user may pick with the
    # pref `model` besides UPSTREAM_MODEL; empty: the pref is not offered.
    upstream_models: tuple[str, ...] = ()
    upstream_system_prompt: str = ""
    upstream_max_tokens: int = 1024
    upstream_temperature: float | None = None  # None: the provider's default
    upstream_connect_timeout: float = 3.0
    upstream_first_token_timeout: float = 20.0
    upstream_total_timeout: float = 90.0
    # USD per million tokens, (prompt, completion), by model: the cost estimate's table.
    upstream_prices: tuple[tuple[str, float, float], ...] = (("gpt-4o-mini", 0.15, 0.60),)
    upstream_daily_budget: float = 0.0  # USD a day before UpstreamBudgetExceeded; 0: none
    replicas: int = 3
    rate_limit: Rate = Rate(30, 60.0)
    rate_burst: int = 10
    rate_limit_enabled: bool = True
    api_keys: tuple[ApiKey, ...] = ()
    # With no keys, /v1/* answers only loopback clients unless this is set (contract.md).
    open_api: bool = False
    # Peers (besides the loopback) whose X-Real-IP names the client: the proxies in front.
    trusted_proxies: tuple[IpNetwork, ...] = ()
    # Per-key (per-integration) GCRA beside the per-user one; None when off.
    key_rate_limit: Rate | None = Rate(1000, 1.0)
    key_rate_burst: int = 2000
    # Long polls (replies ?wait=) are not counted in max_inflight; they have their own bounds.
    longpoll_max: int = 512
    longpoll_per_user: int = 4
    # The web chat (/chat/*): the key its session cookies are signed with (empty: web chat off),
    # and its Server-Sent Events streams' own bounds, per replica and per session.
    webchat_secret: str = ""
    sse_max: int = 2048
    sse_per_session: int = 4
    cache_ttl: float = 300.0
    cache_stale_ttl: float = 86400.0
    upstream_timeout: float = 2.0
    # Circuit breaker (per process): opens on `breaker_failure_ratio` of at least
    # `breaker_min_calls` calls in `breaker_window` seconds, or on `breaker_consecutive`
    # failures in a row; stays open `breaker_open_seconds`, then lets one probe through.
    breaker_window: float = 30.0
    breaker_min_calls: int = 10
    breaker_failure_ratio: float = 0.5
    breaker_consecutive: int = 5
    breaker_open_seconds: float = 10.0
    retry_max_attempts: int = 8
    retry_base_delay: float = 1.0
    retry_max_delay: float = 300.0
    retry_prefetch: int = 16  # jobs the worker holds unacked at once (its concurrency)
    queue_prefix: str = "bot"
    log_format: str = "json"
    log_level: str = "info"
    public_port: int = 8080
    port_base: int = 8001
    metrics_port_base: int = 9101
    worker_metrics_port: int = 9200
    stub_port: int = 8099
    prometheus_port: int = 9090
    alertmanager_port: int = 9093
    # Prometheus, Alertmanager, the alert sink and the exporters; tests opt in per stack.
    observability: bool = True
    scrape_interval: float = 15.0  # seconds; also Prometheus's rule evaluation interval
    prometheus_rules_dir: str = ""  # empty: the repo's prometheus/rules (tests use a fast copy)
    max_inflight: int = 256
    edge_rate: int = 2000  # NGINX limit_req per client address, requests/s
    edge_burst: int = 4000
    edge_conn: int = 1024  # NGINX limit_conn per client address
    idempotency_ttl: int = 86400
    drain_timeout: float = 10.0
    redis_maxmemory: str = DEFAULT_REDIS_MAXMEMORY  # of a Redis `make up` starts itself
    # Chat channels (docs/channels.md): Telegram is enabled when its token and secret are set.
    telegram_bot_token: str = ""
    telegram_webhook_secret: str = ""
    telegram_api_url: str = "https://api.telegram.org"
    telegram_chat_rate: Rate = Rate(1, 1.0)  # sends per chat
    telegram_group_rate: Rate = Rate(20, 60.0)  # sends per group chat (negative chat id)
    telegram_rate: Rate = Rate(30, 1.0)  # sends overall, shared by every delivering process
    # Slack: enabled when the signing secret and the bot token are set.
    slack_signing_secret: str = ""
    slack_bot_token: str = ""
    slack_api_url: str = "https://slack.com/api"
    slack_channel_rate: Rate = Rate(1, 1.0)  # sends per Slack channel
    # Discord: enabled when the public key and the application id are set.
    discord_public_key: str = ""
    discord_application_id: str = ""
    discord_bot_token: str = ""  # only `bot channels discord register-commands` needs it
    discord_api_url: str = "https://discord.com/api/v10"

    def replica_port(self, index: int) -> int:
        """Port of replica `index` (1-based)."""
        return self.port_base + index - 1

    def replica_metrics_port(self, index: int) -> int:
        """Metrics port of replica `index` (1-based)."""
        return self.metrics_port_base + index - 1

    @property
    def alertsink_port(self) -> int:
        """The local alert sink (Alertmanager's webhook receiver): beside Alertmanager."""
        return self.alertmanager_port + 1

    # The ports beside the replicas' metrics ports (BOT_REPLICAS <= 64 stays below them):
    # NGINX's loopback-only stub_status and the exporters Prometheus scrapes.
    @property
    def nginx_exporter_port(self) -> int:
        return self.metrics_port_base + 95

    @property
    def redis_exporter_port(self) -> int:
        return self.metrics_port_base + 96

    @property
    def mtail_port(self) -> int:
        """mtail reading NGINX's access log (responses by status and upstream)."""
        return self.metrics_port_base + 97

    @property
    def nginx_status_port(self) -> int:
        return self.metrics_port_base + 98

    @property
    def call_timeout(self) -> float:
        """The longest one upstream call may take: an LLM's total, else the stub's timeout."""
        if self.upstream_kind == "openai":
            return self.upstream_total_timeout
        return self.upstream_timeout

    @property
    def lease_ms(self) -> int:
        """How long a claim on a message holds before another request may answer it: two
        upstream calls (the asker's, and a cache takeover's) and a margin to store it."""
        return int((2 * self.call_timeout + 5) * 1000)

    @property
    def api_access(self) -> str:
        """Who ``/v1/*`` answers, in words: the replica logs it, `make up` prints it."""
        if self.api_keys:
            return "clients with a key of BOT_API_KEYS"
        if self.open_api:
            return "everyone, unkeyed (BOT_OPEN_API=1)"
        return "loopback clients only (set BOT_API_KEYS, or BOT_OPEN_API=1 to open it)"

    @property
    def telegram_enabled(self) -> bool:
        """`POST /channels/telegram` answers (else 404) and its sends are delivered."""
        return bool(self.telegram_bot_token and self.telegram_webhook_secret)

    @property
    def slack_enabled(self) -> bool:
        return bool(self.slack_signing_secret and self.slack_bot_token)

    @property
    def discord_enabled(self) -> bool:
        return bool(self.discord_public_key and self.discord_application_id)

    @property
    def channels(self) -> tuple[str, ...]:
        """The chat channels enabled by their secrets."""
        enabled = (
            ("telegram", self.telegram_enabled),
            ("slack", self.slack_enabled),
            ("discord", self.discord_enabled),
        )
        return tuple(name for name, on in enabled if on)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values that must never reach a log line."""
        values = (
            *(k.key for k in self.api_keys),
            self.upstream_api_key,
            self.webchat_secret,
            self.telegram_bot_token,
            self.telegram_webhook_secret,
            self.slack_signing_secret,
            self.slack_bot_token,
            self.discord_bot_token,
        )
        return tuple(s for s in values if s)


_Parser = Callable[[str], object]


def _int(lo: int, hi: int) -> _Parser:
    def parse(v: str) -> int:
        n = int(v)
        if not lo <= n <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return n

    return parse


def _float(lo: float, hi: float) -> _Parser:
    def parse(v: str) -> float:
        x = float(v)
        if not lo <= x <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return x

    return parse


def _choice(*options: str) -> _Parser:
    def parse(v: str) -> str:
        v = v.strip().lower()
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return v

    return parse


def _url(*schemes: str) -> _Parser:
    def parse(v: str) -> str:
        if not any(v.startswith(s + "://") for s in schemes):
            raise ValueError(f"must be a {' or '.join(schemes)} URL")
        return v

    return parse


def _bool(v: str) -> bool:
    v = v.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _rate_or_off(v: str) -> Rate | None:
    return None if v.strip().lower() in ("", "0", "off") else parse_rate(v)


def _text(v: str) -> str:
    return v


def _memory(v: str) -> str:
    v = v.strip() or DEFAULT_REDIS_MAXMEMORY
    if not _REDIS_MEMORY_RE.fullmatch(v):
        raise ValueError("must be a size such as 256mb or 2gb")
    return v.lower()


def _optional_float(lo: float, hi: float) -> _Parser:
    bounded = _float(lo, hi)

    def parse(v: str) -> object:
        return None if not v.strip() else bounded(v)

    return parse


_MODEL_RE = re.compile(r"[A-Za-z0-9_.:/@-]{1,128}")


def _model(v: str) -> str:
    v = v.strip()
    if not _MODEL_RE.fullmatch(v):
        raise ValueError("a model name is 1-128 chars of [A-Za-z0-9_.:/@-]")
    return v


def _models(v: str) -> tuple[str, ...]:
    models = tuple(dict.fromkeys(_model(m) for m in v.split(",") if m.strip()))
    return models


def parse_prices(text: str) -> tuple[tuple[str, float, float], ...]:
    """``model=PROMPT/COMPLETION,...``: USD per million prompt and completion tokens."""
    prices: list[tuple[str, float, float]] = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        model, sep, pair = item.partition("=")
        prompt, slash, completion = pair.partition("/")
        try:
            p, c = float(prompt), float(completion)
        except ValueError:
            p = c = -1.0
        if not (sep and slash) or min(p, c) < 0 or max(p, c) > 1e6:
            raise ValueError("expected model=PROMPT/COMPLETION (USD per million tokens), ...")
        prices.append((_model(model), p, c))
    return tuple(prices)


def _webchat_secret(v: str) -> str:
    v = v.strip()
    if v and len(v) < 16:
        raise ValueError("must be at least 16 characters (or empty: web chat off)")
    return v


def _queue_prefix(v: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v):
        raise ValueError("must be 1-64 chars of [A-Za-z0-9_.-]")
    return v


def _telegram_secret(v: str) -> str:
    # Telegram's own rule for `secret_token`: 1-256 of A-Z a-z 0-9 _ -.
    if v and not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", v):
        raise ValueError("must be 1-256 chars of [A-Za-z0-9_-] (Telegram's secret_token)")
    return v


def _hex_key(v: str) -> str:
    # Discord's application public key: 32 bytes of Ed25519, hex.
    if v and not re.fullmatch(r"[0-9a-fA-F]{64}", v):
        raise ValueError("must be 64 hex digits (the application's Ed25519 public key)")
    return v.lower()


def _snowflake(v: str) -> str:
    if v and not re.fullmatch(r"[0-9]{1,20}", v):
        raise ValueError("must be a Discord id (digits)")
    return v


_PORT = _int(1, 65535)
# environment variable -> (field, parser)
_ENV: dict[str, tuple[str, _Parser]] = {
    "REDIS_URL": ("redis_url", _url("redis", "rediss", "unix")),
    "AMQP_URL": ("amqp_url", _url("amqp", "amqps")),
    "UPSTREAM_URL": ("upstream_url", _url("http", "https")),
    "UPSTREAM_KIND": ("upstream_kind", _choice("stub", "openai")),
    "UPSTREAM_MODEL": ("upstream_model", _model),
    "UPSTREAM_API_KEY": ("upstream_api_key", _text),
    "UPSTREAM_MODELS": ("upstream_models", _models),
    "UPSTREAM_SYSTEM_PROMPT": ("upstream_system_prompt", _text),
    "UPSTREAM_MAX_TOKENS": ("upstream_max_tokens", _int(1, 1_000_000)),
    "UPSTREAM_TEMPERATURE": ("upstream_temperature", _optional_float(0.0, 2.0)),
    "UPSTREAM_CONNECT_TIMEOUT": ("upstream_connect_timeout", _float(0.01, 60)),
    "UPSTREAM_FIRST_TOKEN_TIMEOUT": ("upstream_first_token_timeout", _float(0.01, 600)),
    "UPSTREAM_TOTAL_TIMEOUT": ("upstream_total_timeout", _float(0.01, 3600)),
    "UPSTREAM_PRICES": ("upstream_prices", parse_prices),
    "UPSTREAM_DAILY_BUDGET": ("upstream_daily_budget", _float(0, 1e9)),
    "BOT_REPLICAS": ("replicas", _int(1, 64)),
    "BOT_RATE_LIMIT": ("rate_limit", parse_rate),
    "BOT_RATE_BURST": ("rate_burst", _int(0, 100_000)),
    "BOT_RATE_LIMIT_ENABLED": ("rate_limit_enabled", _bool),
    "BOT_API_KEYS": ("api_keys", parse_api_keys),
    "BOT_OPEN_API": ("open_api", _bool),
    "BOT_TRUSTED_PROXIES": ("trusted_proxies", parse_networks),
    "BOT_KEY_RATE_LIMIT": ("key_rate_limit", _rate_or_off),
    "BOT_KEY_RATE_BURST": ("key_rate_burst", _int(0, 1_000_000)),
    "BOT_LONGPOLL_MAX": ("longpoll_max", _int(0, 100_000)),
    "BOT_LONGPOLL_PER_USER": ("longpoll_per_user", _int(0, 1000)),
    "BOT_WEBCHAT_SECRET": ("webchat_secret", _webchat_secret),
    "BOT_SSE_MAX": ("sse_max", _int(0, 100_000)),
    "BOT_SSE_PER_SESSION": ("sse_per_session", _int(0, 1000)),
    "BOT_CACHE_TTL": ("cache_ttl", _float(0, 30 * 86400)),
    "BOT_CACHE_STALE_TTL": ("cache_stale_ttl", _float(0, 30 * 86400)),
    "BOT_UPSTREAM_TIMEOUT": ("upstream_timeout", _float(0.01, 120)),
    "BOT_BREAKER_WINDOW": ("breaker_window", _float(0.1, 3600)),
    "BOT_BREAKER_MIN_CALLS": ("breaker_min_calls", _int(1, 100_000)),
    "BOT_BREAKER_FAILURE_RATIO": ("breaker_failure_ratio", _float(0.01, 1.0)),
    "BOT_BREAKER_CONSECUTIVE": ("breaker_consecutive", _int(1, 100_000)),
    "BOT_BREAKER_OPEN_SECONDS": ("breaker_open_seconds", _float(0.1, 3600)),
    "BOT_RETRY_MAX_ATTEMPTS": ("retry_max_attempts", _int(1, 100)),
    "BOT_RETRY_BASE_DELAY": ("retry_base_delay", _float(0.01, 3600)),
    "BOT_RETRY_MAX_DELAY": ("retry_max_delay", _float(0.01, 86400)),
    "BOT_RETRY_PREFETCH": ("retry_prefetch", _int(1, 1000)),
    "BOT_QUEUE_PREFIX": ("queue_prefix", _queue_prefix),
    "LOG_FORMAT": ("log_format", _choice("json", "console")),
    "LOG_LEVEL": ("log_level", _choice("debug", "info", "warning", "error")),
    "BOT_PUBLIC_PORT": ("public_port", _PORT),
    "BOT_PORT_BASE": ("port_base", _PORT),
    "BOT_METRICS_PORT_BASE": ("metrics_port_base", _PORT),
    "BOT_WORKER_METRICS_PORT": ("worker_metrics_port", _PORT),
    "BOT_STUB_PORT": ("stub_port", _PORT),
    "BOT_PROMETHEUS_PORT": ("prometheus_port", _PORT),
    "BOT_ALERTMANAGER_PORT": ("alertmanager_port", _PORT),
    "BOT_OBSERVABILITY": ("observability", _bool),
    "BOT_SCRAPE_INTERVAL": ("scrape_interval", _float(0.5, 300)),
    "BOT_PROMETHEUS_RULES_DIR": ("prometheus_rules_dir", _text),
    "BOT_MAX_INFLIGHT": ("max_inflight", _int(1, 100_000)),
    "BOT_EDGE_RATE": ("edge_rate", _int(1, 1_000_000)),
    "BOT_EDGE_BURST": ("edge_burst", _int(0, 1_000_000)),
    "BOT_EDGE_CONN": ("edge_conn", _int(1, 65535)),  # NGINX refuses more
    "BOT_IDEMPOTENCY_TTL": ("idempotency_ttl", _int(60, 30 * 86400)),
    "BOT_DRAIN_TIMEOUT": ("drain_timeout", _float(0, 300)),
    "BOT_REDIS_MAXMEMORY": ("redis_maxmemory", _memory),
    "TELEGRAM_BOT_TOKEN": ("telegram_bot_token", _text),
    "TELEGRAM_WEBHOOK_SECRET": ("telegram_webhook_secret", _telegram_secret),
    "TELEGRAM_API_URL": ("telegram_api_url", _url("http", "https")),
    "BOT_TELEGRAM_CHAT_RATE": ("telegram_chat_rate", parse_rate),
    "BOT_TELEGRAM_GROUP_RATE": ("telegram_group_rate", parse_rate),
    "BOT_TELEGRAM_RATE": ("telegram_rate", parse_rate),
    "SLACK_SIGNING_SECRET": ("slack_signing_secret", _text),
    "SLACK_BOT_TOKEN": ("slack_bot_token", _text),
    "SLACK_API_URL": ("slack_api_url", _url("http", "https")),
    "BOT_SLACK_CHANNEL_RATE": ("slack_channel_rate", parse_rate),
    "DISCORD_PUBLIC_KEY": ("discord_public_key", _hex_key),
    "DISCORD_APPLICATION_ID": ("discord_application_id", _snowflake),
    "DISCORD_BOT_TOKEN": ("discord_bot_token", _text),
    "DISCORD_API_URL": ("discord_api_url", _url("http", "https")),
}
# Secrets may come from a file (Docker/Kubernetes secrets): NAME_FILE points at it.
_FILE_VARS = (
    "BOT_API_KEYS",
    "UPSTREAM_API_KEY",
    "BOT_WEBCHAT_SECRET",
    "TELEGRAM_BOT_TOKEN",
    "TELEGRAM_WEBHOOK_SECRET",
    "SLACK_SIGNING_SECRET",
    "SLACK_BOT_TOKEN",
    "DISCORD_BOT_TOKEN",
)
# Settings too long for an environment variable may come from a file the same way.
_TEXT_FILE_VARS = ("UPSTREAM_SYSTEM_PROMPT",)


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a simple ``KEY=value`` file (comments, blank lines and quotes allowed)."""
    if not path.is_file():
        return {}
    out: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def merged_environ(
    environ: Mapping[str, str] | None = None, dotenv: Path | None = None
) -> dict[str, str]:
    """The environment over `.env`: what every process of the stack sees."""
    env = dict(os.environ if environ is None else environ)
    path = dotenv if dotenv is not None else Path(env.get("BOT_DOTENV", ".env"))
    return {**read_dotenv(path), **env}


def load_settings(environ: Mapping[str, str] | None = None, dotenv: Path | None = None) -> Settings:
    """Build `Settings` from the environment, then `.env`, then defaults."""
    env = merged_environ(environ, dotenv)
    for name in _FILE_VARS + _TEXT_FILE_VARS:
        file_name = env.get(name + "_FILE")
        if file_name and name not in env:
            try:
                env[name] = Path(file_name).read_text().strip()
            except OSError as exc:
                raise SettingsError(
                    name + "_FILE", file_name, exc.strerror or "unreadable"
                ) from None
    values: dict[str, object] = {}
    for var, (field, parser) in _ENV.items():
        if var not in env:
            continue
        raw = env[var]
        try:
            values[field] = parser(raw)
        except ValueError as exc:
            shown = "***" if var in _FILE_VARS else raw
            raise SettingsError(var, shown, str(exc)) from None
    settings = Settings(**values)  # type: ignore[arg-type]
    _check(settings)
    return settings


def _check(s: Settings) -> None:
    """Cross-field checks: ranges of ports that must not overlap."""
    replicas = set(range(s.port_base, s.port_base + s.replicas))
    metrics = set(range(s.metrics_port_base, s.metrics_port_base + s.replicas))
    if replicas & metrics:
        raise SettingsError(
            "BOT_METRICS_PORT_BASE", str(s.metrics_port_base), "overlaps the replica ports"
        )
    if max(replicas | metrics) > 65535:
        raise SettingsError("BOT_REPLICAS", str(s.replicas), "port range exceeds 65535")
    if s.public_port in replicas | metrics:
        raise SettingsError("BOT_PUBLIC_PORT", str(s.public_port), "overlaps replica ports")
    if s.upstream_first_token_timeout > s.upstream_total_timeout:
        raise SettingsError(
            "UPSTREAM_FIRST_TOKEN_TIMEOUT",
            str(s.upstream_first_token_timeout),
            "is longer than UPSTREAM_TOTAL_TIMEOUT",
        )


ENV_VARS = tuple(_ENV)  # every variable the stack reads; the runner passes these on
