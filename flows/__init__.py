"""Prefect flows: thin wiring around gsp and mc."""
