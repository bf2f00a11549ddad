"""What every command shares: how a user's mistake ends a command."""

from __future__ import annotations

import typer


def fail(message: str) -> None:
    """Print one error line on stderr and exit 2 (the user's mistake)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def check_named_settings(settings) -> None:
    """Settings whose valid values live in a library above gsp (training recipes, keypoint sets)
    are checked here, at the entry point, so a bad GSP_MC_PRESET or GSP_MC_KEYPOINT_PRESET is one
    line naming the variable before any work starts (gsp.settings cannot import mc)."""
    from gsp.errors import did_you_mean
    from gsp.settings import MCSettings, SettingsError
    from mc.keypoints import KEYPOINT_SETS
    from mc.presets import RECIPES

    for field, valid in (("preset", RECIPES), ("keypoint_preset", KEYPOINT_SETS)):
        value = getattr(settings.mc, field)
        if value not in valid:
            raise SettingsError(f"{MCSettings.env_name(field)}={value!r} (mc.{field}): unknown name"
                                f"{did_you_mean(value, valid)}; choose one of {', '.join(valid)}")
