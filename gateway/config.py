"""Typed settings of the agent gateway (`gateway:` in a Ziggurat config)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class GatewayConfig(BaseModel):
    """An OpenAI-compatible HTTP API on Ray Serve in front of the rollout actors' engines: every call an
    external agent makes is served by the policy and recorded as training data."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    enabled: bool = False
    """Start the gateway with the loop (`ziggurat run`) or on its own (`ziggurat gateway`)."""

    host: str = "127.0.0.1"
    """Address Ray Serve's HTTP proxy binds to. 127.0.0.1 keeps it on this machine; 0.0.0.0 opens it to the
    network (keep `auth: keys` then)."""

    port: int = Field(8000, ge=1, le=65535)
    """HTTP port of Ray Serve's proxy."""

    app_name: str = "ziggurat-gateway"
    """Name of the Serve application (what the Ray dashboard's Serve view shows)."""

    replicas: int = Field(1, ge=1)
    """Gateway replicas (each a Ray actor parsing, templating and routing requests)."""

    auth: Literal["keys", "none"] = "keys"
    """`keys`: every request needs `Authorization: Bearer <key>` with a key from `ziggurat keys create`
    (stored hashed in the database). `none`: no key (only for a gateway bound to 127.0.0.1)."""

    key_refresh_s: float = Field(5.0, gt=0)
    """How often a replica re-reads the keys from the database: a revoked key stops working within this."""

    max_body_bytes: int = Field(1_000_000, ge=1024)
    """Largest request body accepted (413 above it)."""

    max_tokens_cap: int = Field(1024, ge=1)
    """Largest `max_tokens` a request may ask for (400 above it)."""

    default_max_tokens: int = Field(256, ge=1)
    """`max_tokens` of a request that does not set it (at most what the prompt leaves of engine.max_model_len)."""

    max_n: int = Field(16, ge=1)
    """Largest `n` (candidates per call)."""

    max_concurrency_per_key: int = Field(64, ge=1)
    """Requests one key may have in flight on one replica; above it: 429 with Retry-After."""

    max_in_flight: int = Field(256, ge=1)
    """Requests one replica serves at once; above it: 429 with Retry-After, never an unbounded queue."""

    retry_after_s: int = Field(1, ge=1)
    """The Retry-After a 429 answers with."""

    episode_ttl_s: float = Field(3600.0, gt=0)
    """How long an episode waits, after its last call, for its end and reward; then it is closed as aborted
    and never trained on. A prediction market resolving hours later needs hours here."""

    call_timeout_s: float = Field(300.0, gt=0)
    """Deadline of one generation on a rollout actor."""

    ledger_name: str = "ziggurat-gateway-ledger"
    """Name of the Ray actor that keeps open episodes and records their calls."""

    ledger_timeout_s: float = Field(30.0, gt=0)
    """Deadline of one call to the ledger actor."""

    ledger_transport: Literal["socket", "ray"] = "socket"
    """How a replica reaches the ledger on each call. `socket`: a kept TCP connection to a port the ledger opens
    on its node (token-checked; an idle round trip 0.3 ms on the 2-core test machine), through the actor while it
    is not up. `ray`: every call as a Ray actor call (3 ms idle there), for a network that blocks the port."""

    shutdown_timeout_s: float = Field(5.0, ge=0)
    """How long a stopping replica lets requests in flight finish."""

    flush_interval_s: float = Field(0.5, gt=0)
    """How often the ledger writes the records it holds to the database (with `store_before_reply` off, or after
    an outage)."""

    store_before_reply: bool = True
    """A call (and an episode's end or reward) is answered only once its records are stored: one database write
    by the ledger covers every call waiting at that moment (a group commit), so a crashed ledger loses nothing a
    client was answered for. False answers at once and stores within `flush_interval_s`: a few milliseconds faster per
    call, and a ledger crash loses what it held."""

    store_timeout_s: float = Field(5.0, gt=0)
    """How long a call waits for its records to be stored. Past it (the database is down or slow) the call is
    answered anyway with `X-Ziggurat-Recorded: held`: its records stay in the ledger and go with a later flush."""

    chat_template: str | None = None
    """A Jinja chat template the gateway renders chat prompts with instead of the model's own: a file path
    (read when the config loads) or the template text. How a model whose template ignores `tools` (SmolLM2's)
    is offered them; it answers them well only in a format it was trained on, and the replies are parsed as
    `<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks."""

    stream_keepalive_s: float = Field(10.0, gt=0)
    """While a streamed reply's text is held back (a tool call not closed yet; with `tool_parser`, the whole reply),
    the first token generated after this long without a chunk sends an SSE comment line instead, which clients
    skip (the SSE spec): proxies that cut idle connections keep the stream."""

    tool_parser: str | None = None
    """vLLM's tool-call parser for the served model's format (`llama3_json`, `pythonic`, `mistral`, ... as
    `vllm serve --tool-call-parser` takes), when it is not the `<tool_call>` JSON of Hermes and Qwen that the
    gateway reads itself (unset). Replies with tools are then parsed whole: a streamed one arrives when it
    ends, and forced calls are served only if the parser reads `<tool_call>` blocks (`hermes` does). Checked
    when the gateway starts (it imports vLLM, which every process that reads this config need not)."""

    @field_validator("chat_template")
    @classmethod
    def _read_template(cls, value: str | None) -> str | None:
        if value is None or "{{" in value or "{%" in value:
            return value
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(
                f"gateway.chat_template {value!r} is neither a Jinja template (no {{{{ or {{%) nor a readable file; "
                "give the template's path or its text"
            )
        return path.read_text()

    @model_validator(mode="after")
    def _keys_off_only_on_loopback(self) -> GatewayConfig:
        if self.auth == "none" and self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(
                f"gateway.auth: none on host {self.host!r} would let anyone on the network use the policy and write "
                "training data; keep auth: keys (ziggurat keys create NAME) or bind to 127.0.0.1"
            )
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError("gateway.default_max_tokens must be at most gateway.max_tokens_cap")
        return self
