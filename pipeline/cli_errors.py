"""What a command line reports in one line (``error: ...``, exit 2) instead of a traceback: input or
surroundings that the user can fix.

That is the command's own error classes, an ``OSError`` (a missing file or bucket, no permission, a
refused connection, a full disk), a ``ValueError`` (this project's errors for bad input are ValueErrors,
and so are fsspec's "Protocol not known" and timm's and torch's complaints about values) and botocore's
errors (no credentials, an endpoint that does not answer). ``DISTILLERY_DEBUG=1`` lets every one of them
through, traceback and all.
"""

from __future__ import annotations

import os

DEBUG_ENV = "DISTILLERY_DEBUG"
_OURS = ("pipeline", "teacher_cache", "trainer", "infra", "__main__")  # __main__: the `python -m` command's own


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def user_errors(*own: type[BaseException]) -> tuple[type[BaseException], ...]:
    """``own`` (the command's error classes) and the classes above: what `describe` reports; none at all
    when ``DISTILLERY_DEBUG`` asks for tracebacks."""
    if debugging():
        return ()
    errors: list[type[BaseException]] = [*own, OSError, ValueError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    except ImportError:  # pragma: no cover - s3fs brings botocore
        pass
    return tuple(errors)


def describe(exc: BaseException) -> str:
    """``exc`` as the line after ``error:``: this project's errors by their message (which names the field
    or file and the fix), anyone else's led by the exception's type (``FileNotFoundError: [Errno 2] ...``)
    and followed by how to see where it came from."""
    if type(exc).__module__.split(".")[0] in _OURS:
        return str(exc)
    return f"{type(exc).__name__}: {exc} ({DEBUG_ENV}=1 shows the traceback)"
