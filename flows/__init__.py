"""Prefect flows: thin wiring around gsp and mc."""

import os


def use_local_prefect() -> None:
    """With no Prefect server configured (PREFECT_API_URL unset), run flows against Prefect's
    temporary local server instead of failing."""
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
        # The temporary server's telemetry would try the internet (unreachable here) and log errors.
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
