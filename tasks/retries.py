"""When a failed task is retried: only where a retry can succeed where the run just failed.

A full disk, a read-only or forbidden folder, a size limit, a missing file and the
project's own refusals (``ValueError``: bad input, a broken model file, a conflicting run)
fail the same way again; retrying them only delays the message by the retry delays and a
repeat of the work. Anything else (a lost connection, a timeout, a worker that died) is
retried.
"""

from __future__ import annotations

import errno
from typing import Any

PERMANENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.EFBIG,
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
    }
)
"""Write and path errors that a retry meets again."""


def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: False for a failure that would repeat itself."""
    try:
        state.result()
    except OSError as error:
        return error.errno not in PERMANENT_ERRNOS
    except ValueError:
        return False
    except Exception:
        return True
    return True
