"""One logging setup for every entrypoint (CLI, main job, training job), with secrets redacted.

Every log line passes through `RedactSecrets`: passwords inside URLs (`scheme://user:secret@host`) and the
values of secret-looking environment variables (database password, W&B key, tokens) never reach a log.
"""

from __future__ import annotations

import logging
import os
import re

_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]+:)([^@\s]+)(@)", re.IGNORECASE)
_SECRET_NAMES = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|ACCESS_KEY)", re.IGNORECASE)


def secret_values() -> list[str]:
    """Values of environment variables whose names say they are secrets (long enough to be worth hiding)."""
    return sorted(
        {value for name, value in os.environ.items() if _SECRET_NAMES.search(name) and len(value) >= 6},
        key=len,
        reverse=True,
    )


def redact(text: str, secrets: list[str] | None = None) -> str:
    text = _URL_PASSWORD.sub(r"\1***\3", text)
    for secret in secret_values() if secrets is None else secrets:
        text = text.replace(secret, "***")
    return text


class RedactSecrets(logging.Filter):
    """Rewrites each record's final message with secrets replaced by ***."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


VERBOSE_ENV = "ZIGGURAT_VERBOSE"
"""Set by `init_ray` for every Ray worker (actors, tasks, Ray Train workers), so `configure_logging()` in a
worker follows the driver's --verbose."""

# Loggers of this project's own packages (module loggers) and its named ones (ziggurat.*).
OWN_LOGGERS = ("ziggurat", "cluster", "recorder", "rollout", "trainer")
# Libraries that announce routine progress at INFO; quiet mode leaves them their warnings and errors.
LIBRARY_LOGGERS = (
    "vllm",
    "ray",
    "ray.train",
    "ray.tune",
    "ray.data",
    "ray.serve",
    "alembic",
    "transformers",
    "huggingface_hub",
    "datasets",
    "peft",
    "torch",
    "httpx",
    "httpcore",
    "urllib3",
    "filelock",
    "wandb",
    "matplotlib",
    "PIL",
    "asyncio",
)


def verbose_from_env() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


def library_log_level(verbose: bool | None = None) -> str:
    """The level name libraries log at: INFO when verbose, else WARNING (e.g. for Ray Train's LoggingConfig)."""
    return "INFO" if (verbose_from_env() if verbose is None else verbose) else "WARNING"


def worker_env(verbose: bool) -> dict[str, str]:
    """Environment for Ray workers (rollout actors hosting vLLM, Ray Train workers, the controller) whose
    output Ray forwards to the driver's console: their libraries log at WARNING and draw no progress bars
    unless verbose. A variable the user exported wins (see `init_ray`)."""
    env = {
        VERBOSE_ENV: "1" if verbose else "0",
        "VLLM_LOGGING_LEVEL": "INFO" if verbose else "WARNING",  # read when vllm is first imported
        "RAY_LOGGER_LEVEL": "info" if verbose else "warning",  # the `ray` logger of every worker process
    }
    if not verbose:
        env.update(
            {
                # tqdm turns any non-empty value into True, so these are set only to switch bars off.
                "TQDM_DISABLE": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                # Ray Train gives each training worker's root logger an INFO console handler (one "Reporting
                # training result" line per update, and the trainer's INFO); without it, warnings still print.
                "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
                "WANDB_SILENT": "true",
                # libraries' deprecation notices (Ray's, torch's inside vLLM) are for their developers, not a run
                "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
                "TORCH_CPP_LOG_LEVEL": "ERROR",  # c10's C++ notices (NUMA binding) at every engine start
            }
        )
    return env


def configure_logging(verbose: bool | None = None) -> None:
    """Log records to stderr, secrets redacted. Quiet by default: the console shows cluster.console's phase
    lines, so log records below WARNING are dropped, this project's own and the libraries' alike.
    `verbose=True` (the CLI's --verbose) shows INFO from everything. `None` (inside Ray workers) follows
    ZIGGURAT_VERBOSE, which `init_ray` passes on from the driver."""
    if verbose is None:
        verbose = verbose_from_env()
    else:  # an explicit choice (a --verbose flag) reaches the Ray workers this process starts
        os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # basicConfig does nothing where a handler exists already (Ray workers, pytest), so the levels are set
    # explicitly as well.
    logging.getLogger().setLevel(level)
    for name in OWN_LOGGERS + LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
    # Alembic announces each of its plugins at INFO whenever it is imported; that is noise even when verbose.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
