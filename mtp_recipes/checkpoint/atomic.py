"""Write a directory completely or not at all, so the last good checkpoint always survives."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mtp_recipes.errors import CheckpointError

logger = logging.getLogger(__name__)

# How a full disk shows up: the OS error itself, or torch's zip writer noticing a short write.
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "unexpected pos")


def is_disk_full(error: BaseException) -> bool:
    """True when ``error`` (or an exception it wraps) says the disk is full.

    Looks through ``__cause__``/``__context__`` and the per-rank failures of torch.distributed.checkpoint's
    ``CheckpointException``, which carries the original exceptions rather than chaining them.
    """
    stack: list[object] = [error]
    seen: set[int] = set()
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(e) for text in _DISK_FULL_TEXT):
            return True
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return False


def free_mb(directory: Path) -> int:
    """Free space, in MB, on the filesystem holding ``directory`` (or its nearest existing parent)."""
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return shutil.disk_usage(directory).free // 2**20


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``target``; on success it replaces ``target`` by renames.

    A crash or error while writing leaves ``target`` untouched and removes the partial copy. The swap
    is two renames on the same filesystem; the old directory is deleted only after the new one is in
    place (a kill between the two renames is undone by :func:`recover_interrupted_writes`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise CheckpointError(
                f"no space left on device while writing {target}: free space under {target.parent} "
                f"({free_mb(target.parent)} MB free now) or change the output dir; the partial copy was removed "
                "and the previous checkpoint there is intact"
            ) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def recover_interrupted_writes(directory: Path) -> list[str]:
    """Undo what a killed :func:`atomic_directory` left in ``directory``; return what was done, one line each.

    A partial copy (``.NAME.tmp-PID``) is removed. A previous copy moved aside (``.NAME.old-PID``) is put
    back when ``NAME`` is missing (the kill fell between the two renames), else removed.
    """
    done = []
    for path in sorted(directory.glob(".*.tmp-*")) + sorted(directory.glob(".*.old-*")):
        name = path.name[1:].rsplit(".", 1)[0]
        if path.name.split(".")[-1].startswith("old-") and not (directory / name).exists():
            os.replace(path, directory / name)
            done.append(f"restored {directory / name} from an interrupted replacement")
        else:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed the unfinished write {path}")
    return done
