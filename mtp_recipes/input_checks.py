"""The checks of a run's inputs that need neither torch nor transformers, run right after the config's.

A wrong ``model.path`` or a data source that is missing, malformed or in the wrong format then costs a second
or two, not the 5-20 s torch and transformers take to import; a run directory given as ``model.path`` becomes
its export here, once, in one log line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from mtp_recipes.checkpoint.locate import check_hub_id, local_model_dir
from mtp_recipes.data.formats import resolve_format
from mtp_recipes.data.sources import load_source

log = logging.getLogger("mtp_recipes")


def check_inputs(cfg: DictConfig, data: bool = True) -> None:
    """Check ``model.path`` and (with ``data``) the data sources of ``cfg`` (a schema config), in place: a run
    directory in ``model.path`` is replaced by the export it holds; a Hub id must be reachable or cached."""
    if cfg.model.path is not None:
        local = local_model_dir(cfg.model.path)
        if local is None:
            check_hub_id(cfg.model.path)
        elif local != Path(cfg.model.path).expanduser():
            if int(os.environ.get("RANK", "0")) == 0:
                log.info("model.path=%s is a run directory: using its export %s", cfg.model.path, local)
            cfg.model.path = str(local)
    d = cfg.data
    for key, source, split in (("data.source", d.source, d.split), ("data.eval_source", d.eval_source, d.eval_split)):
        if data and source is not None:  # datasets caches what it reads: the run's own load of it is quick
            rows = load_source(source, split, d.text_sample_by)
            resolve_format(rows.column_names, d.format, d.text_field, d.messages_field, f"{key}={source!r}")
