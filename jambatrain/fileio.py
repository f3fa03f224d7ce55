"""The one atomic file write of jambatrain: a reader (or a resume after a crash) sees the old file or the new one,
never half of one."""
from __future__ import annotations

import os
from typing import Callable, IO, Union


def atomic_write(path: str, data: Union[bytes, str, Callable[[IO[bytes]], object]], *, tmp: str | None = None,
                 fsync: bool = True) -> int:
    """Write ``data`` (bytes, str as UTF-8, or a function writing to the open binary file) to ``path`` through a temp
    file in the same directory (``tmp``, default ``PATH.tmpPID``), fsynced, then renamed over ``path``. Returns the
    size written. The temp file is removed when the write fails."""
    tmp = tmp or f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return os.path.getsize(path)
