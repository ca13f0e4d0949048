"""Where a serving stack's Python processes spend their GIL time, sampled with py-spy.

`profile(seconds)` finds the processes of one machine's serving path by their titles (Ray
Serve's proxy and replicas, vLLM's engine core, a plain vLLM API server), records each for
`seconds` at once with `py-spy record --gil --nonblocking` (only samples holding the GIL, so
the sample share is how busy the interpreter is; the target is never paused), and returns
per process: GIL share, and the functions with the most samples, on top of the stack (self)
and anywhere on it (total). Errors (no py-spy, no ptrace permission) are returned, not raised.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

# Process title (ray:: titles, vLLM's setproctitle) or command line -> role in the table.
ROLES = (
    ("ProxyActor", "serve proxy"),
    ("ServeReplica", "serve replica"),
    ("EngineCore", "vLLM engine core"),
    ("vllm.entrypoints.openai.api_server", "vLLM API server"),
)
RATE = 200  # samples per second
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def find() -> list[tuple[int, str]]:
    """(pid, role name) of each serving process on this machine."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for marker, role in ROLES:
            if marker in cmd:
                found.append((int(proc.name), f"{role}: {cmd.strip()[:80]}"))
                break
    return found


def _frame(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    return f"{m['func']} ({Path(m['file']).name})" if m else frame.strip()


def summarize(raw: str, seconds: float, top: int = 15) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks -> GIL share and the top functions."""
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";")]
        # py-spy puts the thread first ("process 12:"/"thread (0x..)"): not a function
        frames = [f for f in frames if not f.startswith(("process ", "thread "))] or frames
        samples += n
        own[frames[-1]] += n
        for f in set(frames):
            anywhere[f] += n

    def share(c: collections.Counter[str]) -> list[list[Any]]:
        return [[f, round(n / samples, 3)] for f, n in c.most_common(top)] if samples else []

    return {
        "samples": samples,
        "gil_share": round(samples / (RATE * seconds), 3),
        "self": share(own),
        "total": share(anywhere),
    }


def profile(seconds: float, binary: str | None = None) -> dict[str, Any]:
    """Record every serving process for `seconds`, all at once; {role: summary or error}."""
    spy = binary or shutil.which("py-spy")
    if spy is None:
        return {"error": "py-spy is not installed"}
    procs = find()
    if not procs:
        return {"error": "no serving process found"}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        running = []
        for pid, role in procs:
            raw = Path(tmp) / f"{pid}.txt"
            cmd = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds))]
            cmd += ["--rate", str(RATE), "--gil", "--nonblocking", "--format", "raw"]
            cmd += ["--output", str(raw)]
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            running.append((pid, role, raw, p))
        for pid, role, raw, p in running:
            try:
                _, err = p.communicate(timeout=seconds + 60)
            except subprocess.TimeoutExpired:
                p.kill()
                err = "py-spy did not finish"
            key = f"{pid} {role}"
            if raw.exists():
                out[key] = summarize(raw.read_text(), seconds)
            else:
                out[key] = {"error": (err or f"py-spy exited {p.returncode}").strip()[-300:]}
    return out
