"""Every error of nvfp4_common, and the base of every error a user can cause or fix.

An `Nvfp4Error` is not a bug: bad input, a missing job, an unreadable file. Its str() is
one line that says what went wrong and what to do, so `nvfp4ctl` prints it as is (and a
traceback only for everything else, or with --debug). Errors that belong to one service
stay in its module but derive from `Nvfp4Error`.

Most also keep a built-in base (ValueError, LookupError, RuntimeError) so code that
catches those, and callers of the standard library's kind, still see them.
"""

from __future__ import annotations


class Nvfp4Error(Exception):
    """An error a user can cause or fix; its str() is one line that says what to do."""


class InvalidSettings(Nvfp4Error, ValueError):
    """NVFP4_* settings that do not validate (the line names each one, never its value)."""


class JobNotFound(Nvfp4Error, LookupError):
    """No job with this id: never submitted, expired after its result TTL, or purged."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job {job_id!r} (it may have expired or been purged)")


class InvalidTransition(Nvfp4Error, ValueError):
    """The job is not in a state that allows the operation."""


class CorruptJob(Nvfp4Error, ValueError):
    """A job hash that cannot be parsed (written by other software or edited by hand)."""

    def __init__(self, job_id: str, problem: str) -> None:
        self.job_id = job_id
        problem = " ".join(problem.split())[:300]  # one line, whatever the bad value holds
        super().__init__(f"job {job_id} in Redis cannot be read: {problem}")


class CheckpointError(Nvfp4Error, ValueError):
    """A checkpoint that cannot be served; the message names the file and what to do."""
