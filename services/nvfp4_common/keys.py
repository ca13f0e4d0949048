"""Every Redis key the stack uses, in one place.

All keys share one prefix so a Redis can be shared with other applications and a
`SCAN nvfp4:*` shows everything we own. Values are JSON or plain strings, never pickle.
"""

PREFIX = "nvfp4:"

# Hash per job: scalar fields plus JSON strings (spec, progress, result). Expires
# `result_ttl_s` after the job ends.
JOB = PREFIX + "job:"
# List per job: its most recent log lines (capped at `job_log_lines`).
JOB_LOG = PREFIX + "log:"

# Sorted set of queued job ids. Score = priority rank * 1e13 + submit sequence number,
# so the lowest score is the next job: higher priority first, then first come first served.
QUEUE = PREFIX + "queue"
# Counter giving each submitted job its sequence number.
SUBMIT_SEQ = PREFIX + "submit-seq"
# Sorted set of running job ids scored by heartbeat deadline (epoch seconds): an entry
# whose deadline passed belongs to a dead worker and is re-queued or failed.
RUNNING = PREFIX + "running"
# Sorted set of ended job ids scored by end time; used for listing and purging.
ENDED = PREFIX + "ended"
# List used only to wake idle workers the moment a job is queued.
WAKE = PREFIX + "wake"

# Sorted set of worker ids scored by last heartbeat, and a hash per worker with details.
WORKERS = PREFIX + "workers"
WORKER = PREFIX + "worker:"

# List of Ray Serve configs (JSON), newest first: what was live before each model switch
# made by `nvfp4ctl serve deploy`, so `serve rollback` can bring it back. Capped.
SERVE_HISTORY = PREFIX + "serve:history"


def job(job_id: str) -> str:
    return JOB + job_id


def job_log(job_id: str) -> str:
    return JOB_LOG + job_id


def worker(worker_id: str) -> str:
    return WORKER + worker_id
