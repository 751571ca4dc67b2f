"""Files written whole or not at all: caches, shards and checkpoints that a concurrent reader (replicas starting
together) or a resumed run (after a kill mid-write) must never see half of; and whether the Hugging Face hub can be
asked for files at all."""
from __future__ import annotations

import os
import shutil
import socket
from urllib.parse import urlparse
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


def hub_offline(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub cannot be reached now: HF_HUB_OFFLINE is set, or its host does not resolve or
    accept a connection within `timeout_s`. Asked before loading by hub id, so an offline machine uses its local
    copy or fails at once, instead of after the hub client's ~50 s of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
    except OSError:
        return True
    return False
