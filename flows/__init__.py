"""Prefect flows: thin wiring around gsp and mc."""

import os


def use_local_prefect() -> None:
    """With no Prefect server configured (PREFECT_API_URL unset), run flows against Prefect's
    temporary local server instead of failing."""
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
        # The temporary server's telemetry would try the internet (unreachable here) and log errors.
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def warn_unknown_settings() -> None:
    """Name each misspelt ``GSP_*`` variable in the flow run's log, as the CLI does on stderr: a
    worker's flow runs have no CLI, and the settings ignore such a variable without a word. Call
    at the start of a flow; said once per process."""
    from prefect import get_run_logger

    from gsp.settings import unsaid_unknown_env_names

    for line in unsaid_unknown_env_names(os.environ):
        get_run_logger().warning(line)
