"""Errors that clipbench reports to users."""


class ClipbenchError(Exception):
    """User-facing error: the CLI prints the message without a traceback and exits non-zero."""
