"""Files written whole or not at all: caches, shards and checkpoints that a concurrent reader (replicas starting
together) or a resumed run (after a kill mid-write) must never see half of."""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def written_whole(target: Path) -> Iterator[Path]:
    """A temporary path beside `target` (same suffix) for the block to write, a file or a folder; it becomes `target`
    in one rename when the block ends, or is removed if the block raises."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.stem}.tmp{os.getpid()}{target.suffix}")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
