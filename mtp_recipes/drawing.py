"""matplotlib for the commands that draw (``plot``, ``report``): a core dependency, imported when first drawn."""

from __future__ import annotations

from typing import Any

from mtp_recipes.log_noise import quiet


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, without the font-cache log lines of a first import
    (it takes a second, so only the commands that draw pay it)."""
    with quiet("matplotlib.font_manager"):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    return plt
