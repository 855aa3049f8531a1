"""Where a ``model.path`` points: a checkpoint directory, a run directory's export, or a Hub id.

Torch-free, so the commands check it before torch and transformers load. A run directory (what ``finetune``
writes) stands for its ``final/`` export, else its newest ``checkpoints/step_N/`` export. A Hub id is fetched
only when the Hub answers within seconds (or from the local Hugging Face cache): ``huggingface_hub`` alone
retries for about 30 s before it gives up offline.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from mtp_recipes.errors import CheckpointError

CONFIG_NAME = "config.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_STEP_DIR = re.compile(r"^step_(\d+)$")
# What model.path needs of a Hub checkpoint (the weights, config, tokenizer and chat template).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def run_dir_export(run_dir: Path) -> Path | None:
    """The export a run directory stands for: ``final/``, else the newest ``checkpoints/step_N/``; None when
    ``run_dir`` is not a run directory with an export. Exports are renamed into place when complete, so one
    with a config.json is whole."""
    if (run_dir / "final" / CONFIG_NAME).is_file():
        return run_dir / "final"
    steps = [
        (int(m[1]), p)
        for p in (run_dir / "checkpoints").glob("step_*")
        if (m := _STEP_DIR.match(p.name)) and (p / CONFIG_NAME).is_file()
    ]
    return max(steps)[1] if steps else None


def local_model_dir(name_or_path: str) -> Path | None:
    """The checkpoint directory ``name_or_path`` names on disk (a run directory: its export); None for a Hub id.

    Raises a one-line CheckpointError for a path that is neither.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            return path
        export = run_dir_export(path)
        if export is None:
            raise CheckpointError(
                f"model.path={name_or_path} has no config.json: it is neither a Hugging Face checkpoint nor a run "
                "directory with an export (final/ or checkpoints/step_N/)"
            )
        return export
    if path.exists():
        raise CheckpointError(f"model.path={name_or_path} is a file; point it at a checkpoint directory")
    if not _HUB_ID.match(name_or_path):
        raise CheckpointError(f"model.path={name_or_path} does not exist (nor is it a Hub id such as org/name)")
    return None


def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached now (None when it can), found within ``timeout_s``."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        return f"{host} cannot be reached ({e.strerror or type(e).__name__})"
    return None


def fetch_from_hub(repo_id: str, patterns: list[str]) -> Path:
    """A local snapshot of ``repo_id`` holding the files matching ``patterns``: downloaded when the Hub
    answers, else the one in the local Hugging Face cache; one CheckpointError line when neither."""
    from huggingface_hub import snapshot_download

    offline = hub_unreachable()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline is not None))
    except Exception as e:  # noqa: BLE001 - any hub failure means the same thing to the user
        reason = offline or f"{type(e).__name__}: {' '.join(str(e).split()) or 'no message'}"
        raise _unfetchable(repo_id, reason, cached=offline is None) from None


def check_hub_id(repo_id: str) -> None:
    """One CheckpointError line, at once, when ``repo_id`` can be neither downloaded now nor read from the cache."""
    from huggingface_hub import try_to_load_from_cache

    offline = hub_unreachable()
    if offline is not None and not isinstance(try_to_load_from_cache(repo_id, CONFIG_NAME), str):
        raise _unfetchable(repo_id, offline, cached=False)


def _unfetchable(repo_id: str, reason: str, cached: bool) -> CheckpointError:
    not_cached = "" if cached else " and it is not in the local Hugging Face cache"
    return CheckpointError(
        f"model.path={repo_id} is not a local directory and could not be fetched from the Hugging Face Hub "
        f"({reason}){not_cached}; download it first (hf download {repo_id} --local-dir DIR) and set model.path=DIR"
    )


def resolve_model_dir(name_or_path: str, patterns: list[str] | None = None) -> Path:
    """A local checkpoint directory for a checkpoint path, a run directory or a Hub id."""
    local = local_model_dir(name_or_path)
    return local if local is not None else fetch_from_hub(name_or_path, patterns or HUB_PATTERNS)
