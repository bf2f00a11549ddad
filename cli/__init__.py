"""The `gsp` command line: typer commands on top of the gsp, mc and demo libraries and the Prefect flows.

Nothing below this package imports it (see README, Development)."""
