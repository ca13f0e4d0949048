"""Errors a job can end with."""

from nvfp4_common.errors import Nvfp4Error


class JobError(Nvfp4Error):
    """Bad input or an impossible request: the job fails with this one-line message and
    is not retried (running it again would fail the same way)."""
