"""The one error family for user mistakes.

Anything a user can fix (a config value, a missing or malformed file, a checkpoint that does not
fit, an input image, a locked run folder) raises a `UserError` subclass whose message names the
file or field, what was expected and what was found. `unet_jax.cli.common` prints such an error as one
line on stderr with exit code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Sequence


class UserError(Exception):
    """A mistake the user can fix; its message is one self-contained line."""


class ConfigError(UserError, ValueError):
    """A config value is missing, of the wrong kind or out of range."""


class DataError(UserError, ValueError):
    """A dataset file or layout is not what the builder expects."""


class DataProblems(DataError):
    """Several dataset problems found at once (a folder dataset's checks): `problems` holds one
    line per problem, each naming its file; the command lines print every line."""

    def __init__(self, problems: Sequence[str]):
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


class CheckpointError(UserError, ValueError):
    """A checkpoint (mmseg .pth, weights folder, training checkpoint) is unreadable or unfit."""


class UnsafeCheckpointError(CheckpointError):
    """A .pth asks to import or call something outside the reader's allowlist."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint folder cannot be read back as it was written (unreadable, or its arrays do
    not match the digest recorded when it was saved)."""


class InputError(UserError, ValueError):
    """A command-line input (image, folder, output path) cannot be used as given."""


class WorkdirError(UserError):
    """The run folder cannot be used: locked by another run, or holding another model."""


class DivergenceError(UserError, FloatingPointError):
    """Training produced non-finite values (loss, parameters or BatchNorm statistics)."""


def warn(message: str) -> None:
    """A one-line warning on stderr (process 0 only)."""
    import jax
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def one_line(err: BaseException) -> str:
    """The message of `err` folded onto one line, without the kilobyte-long driver spec that
    tensorstore appends to its errors (" [tensorstore_spec='{...}']")."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    text = re.sub(r" \[tensorstore_spec='.*?'\]", "", text)
    return text or type(err).__name__


# The OS's words for the storage failures a user can act on (a full disk, a read-only folder, no
# permission, a quota), as TensorFlow and tensorstore quote them inside their own exception types.
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT)


def storage_error(err: BaseException) -> str | None:
    """The OS error text of a failed write, whichever library raised it (an `OSError`, a
    tensorstore `ValueError` carrying `os_error_code='N'`, a TensorFlow `OpError` quoting the
    OS message), or None when `err` is not such a failure or is already a `UserError`."""
    if isinstance(err, UserError):
        return None
    if isinstance(err, OSError):
        return err.strerror or one_line(err)
    text = str(err)
    code = re.search(r"os_error_code='(\d+)'", text)
    if code is not None:
        return os.strerror(int(code.group(1)))
    for number in _STORAGE_ERRNOS:
        if os.strerror(number) in text:
            return os.strerror(number)
    return None
