"""Errors a job can end with."""


class JobError(Exception):
    """Bad input or an impossible request: the job fails with this one-line message and
    is not retried (running it again would fail the same way)."""
