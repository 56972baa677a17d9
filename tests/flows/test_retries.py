"""Which failed tasks are retried: those a retry can fix."""

import errno

import pytest
from gaussian_ad_tasks.retries import worth_retrying
from prefect.states import Completed, Failed

from gaussian_ad.stats.arrayfile import ModelFileError


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/out/part.parquet"), False),
        (OSError(errno.EROFS, "Read-only file system", "/out"), False),
        (OSError(errno.EFBIG, "File too large", "/out/part.parquet"), False),
        (PermissionError(errno.EACCES, "Permission denied", "/out"), False),
        (ModelFileError("/m.safetensors: not a readable gaussian-ad model file"), False),
        (ValueError("shard size 0"), False),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), True),
        (TimeoutError("the store did not answer"), True),
        (RuntimeError("a worker died"), True),
    ],
)
def test_only_failures_a_retry_can_fix_are_retried(error, retried):
    assert worth_retrying(None, None, Failed(data=error)) is retried


def test_a_state_without_an_exception_is_retried():
    assert worth_retrying(None, None, Completed(data=1)) is True
