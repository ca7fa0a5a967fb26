"""What a command line reports in one line (``error: ...``, exit 2) instead of a traceback: input or
surroundings that the user can fix.

That is an ``OSError`` (a missing file or bucket, no permission, a refused connection, a full disk), a
``ValueError`` (this project's errors for bad input are ValueErrors, and so are fsspec's "Protocol not
known" and timm's and torch's complaints about values), an unknown recipe, and botocore's errors (no
credentials, an endpoint that does not answer). ``DISTILLERY_DEBUG=1`` lets them through, traceback and all.
"""

from __future__ import annotations

import os

DEBUG_ENV = "DISTILLERY_DEBUG"
_OURS = ("pipeline", "teacher_cache", "trainer", "infra")


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes `describe` reports; none when ``DISTILLERY_DEBUG`` asks for tracebacks."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return ()
    from trainer.recipes import UnknownRecipe

    errors: list[type[BaseException]] = [OSError, ValueError, UnknownRecipe]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    except ImportError:  # pragma: no cover - s3fs brings botocore
        pass
    return tuple(errors)


def describe(exc: BaseException) -> str:
    """``exc`` as the line after ``error:``: this project's errors by their message (which names the field
    or file and the fix), anyone else's led by the exception's type (``FileNotFoundError: [Errno 2] ...``)."""
    message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return message if type(exc).__module__.split(".")[0] in _OURS else f"{type(exc).__name__}: {message}"
