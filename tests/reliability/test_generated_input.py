"""Generated bad input is refused cleanly, never half-accepted and never a crash.

- JobSpec: hypothesis builds arbitrary dicts (real field names with good, borderline and
  junk values, plus unknown keys). Each either validates, and then a submit through a
  real Redis reads back equal, stores only UTF-8 text/JSON and derives an output folder
  inside the models directory; or it raises pydantic's ValidationError. Nothing else.
- Name fields (model, calibration data, output name, exclude patterns), good values with
  an odd ending or generated: accepted only without control characters or non-UTF-8
  text, and an output name only as one plain folder name.
- Job hashes corrupted in Redis (generated garbage in the JSON fields spec, progress,
  result): reading the job raises CorruptJob with one line; a claim ends it `failed`
  with that line instead of crashing; a real worker process skips it and runs the next job.
- `nvfp4ctl` with generated values (jobs submit options, job ids for show/cancel/retry/
  logs, purge/list options, the Redis URL and NVFP4_* variables): the exit code is 0, 1
  or 2, an error is one line without a traceback, and a refused command leaves Redis
  exactly as it was.

Example counts are printed and, with NVFP4_RELIABILITY_STATS set, recorded.
"""

from __future__ import annotations

import json
import re
import string
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError

from nvfp4_admin.cli import cli
from nvfp4_common import keys
from nvfp4_common.jobs import JobResult, JobSpec, JobState, Priority
from nvfp4_common.queue import CorruptJob, JobQueue
from nvfp4_common.recipes import RECIPES
from nvfp4_common.settings import Settings
from nvfp4_worker import publish
from tests.reliability.redis_contents import snapshot
from tests.worker_harness import Workers, ended, wait_for

pytestmark = pytest.mark.timeout(300)

# Moderate budgets: each example of the CLI tests is a full CLI invocation against Redis.
# deadline=None because the machine is shared and slow examples are not failures here.
FAST = hypothesis_settings(
    max_examples=150,
    deadline=None,
    database=None,  # no .hypothesis folder in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CLI = hypothesis_settings(FAST, max_examples=100)

# --- strategies -------------------------------------------------------------------------

# Pieces that make names interesting: path syntax, encodings of it, whitespace and control
# characters, a lone surrogate (what Python makes of non-UTF-8 bytes in argv), unicode.
SEGMENTS = st.sampled_from(
    [
        "..",
        ".",
        "/",
        "\\",
        "~",
        "%2e%2e",
        "org",
        "name",
        "Qwen",
        "x",
        "-",
        "_",
        " ",
        "\n",
        "\r",
        "\t",
        "\x00",
        "\x1b[31m",
        "\u2028",
        "\x85",
        "\udcff",
        "é",
        "模型",
        "*",
        ":",
        "=",
        "@",
        "$(id)",
        "'",
        '"',
    ]
)
NAMES = st.one_of(
    st.lists(SEGMENTS, min_size=1, max_size=6).map("".join),
    st.text(max_size=40),
    st.text(alphabet=string.ascii_letters + string.digits + "._-/", min_size=1, max_size=140),
    st.sampled_from(["Qwen/Qwen3-0.6B", "org/name", "tiny-NVFP4", "a" * 129, "a" * 4097]),
)
# A good value followed by one odd piece: where a validator's pattern may stop looking.
ENDS_ODDLY = st.one_of(
    st.sampled_from(["\n", "\r\n", "\x00", " ", "/..", "\u2028", "\udcff", "\t"]),
    st.lists(SEGMENTS, min_size=1, max_size=2).map("".join),
)
JUNK = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        NAMES,
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)
COUNTS = st.one_of(
    st.integers(min_value=-3, max_value=3),
    st.integers(min_value=0, max_value=2_000_000),
    st.sampled_from([100_000, 100_001, 1_048_576, 1_048_577, 10_000, 10_001, 2**63]),
    st.floats(allow_nan=True),
    st.sampled_from(["8", " 8", "8.0", "0x10", "1e3", "", "eight", True, False]),
)
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "model": NAMES,
    "format": st.sampled_from(["nvfp4", "nvfp4-fp8kv", "fp8", "NVFP4", "int3", "", "nvfp4 "]),
    "calib_dataset": NAMES,
    "calib_samples": COUNTS,
    "calib_seq_len": COUNTS,
    "eval_samples": COUNTS,
    "exclude": st.lists(st.one_of(NAMES, ENDS_ODDLY.map(lambda e: "*mlp*" + e)), max_size=4)
    | st.lists(st.just("*mlp*"), min_size=255, max_size=258),
    "output_name": st.one_of(st.none(), NAMES, ENDS_ODDLY.map(lambda e: "out" + e)),
    "recipe": st.one_of(st.none(), st.sampled_from([*RECIPES, "NVFP4", "", "awq", "nvfp4 "])),
    "layerwise": st.one_of(st.booleans(), st.sampled_from(["yes", 1, 0, "", None])),
    "target": st.one_of(
        st.none(),
        st.fixed_dictionaries(
            {},
            optional={
                "max_ppl_increase_pct": COUNTS,
                "max_kl": st.one_of(COUNTS, st.floats(min_value=0, max_value=1)),
                "max_size_gb": COUNTS,
            },
        ),
    ),
}
assert set(PLAUSIBLE) == set(JobSpec.model_fields), "a JobSpec field has no strategy here"
# Values a careful user would send, so that a good share of the examples is accepted and
# the accepted path (submit, read back, derived output name) is exercised too.
GOOD: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["Qwen/Qwen3-0.6B", "/models/base", "org/name", "./rel/model"]),
    "format": st.sampled_from(["nvfp4", "nvfp4-fp8kv", "fp8"]),
    "calib_dataset": st.sampled_from(["allenai/c4", "/data/calib.txt", "org/data:en"]),
    "calib_samples": st.integers(min_value=1, max_value=100_000),
    "calib_seq_len": st.integers(min_value=1, max_value=1_048_576),
    "eval_samples": st.integers(min_value=0, max_value=10_000),
    "exclude": st.lists(st.sampled_from(["*mlp*", "lm_head", "*layers.0.*"]), max_size=3),
    "output_name": st.one_of(
        st.none(), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True)
    ),
    "recipe": st.one_of(st.none(), st.sampled_from(list(RECIPES))),
    "layerwise": st.booleans(),
    "target": st.one_of(
        st.none(),
        st.builds(
            dict,
            max_ppl_increase_pct=st.floats(min_value=0.5, max_value=50),
            max_kl=st.floats(min_value=0.001, max_value=1),
        ),
    ),
}


@st.composite
def spec_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """Good values with some fields replaced by borderline or junk ones, sometimes with
    unknown keys; now and then junk throughout."""
    if draw(st.integers(min_value=0, max_value=4)) == 0:
        junk = {name: st.one_of(values, JUNK) for name, values in PLAUSIBLE.items()}
        data = draw(st.fixed_dictionaries({}, optional=junk))
    else:
        optional = {k: v for k, v in GOOD.items() if k != "model"}
        data = draw(st.fixed_dictionaries({"model": GOOD["model"]}, optional=optional))
        for name in draw(st.lists(st.sampled_from(sorted(PLAUSIBLE)), max_size=2, unique=True)):
            data[name] = draw(st.one_of(PLAUSIBLE[name], JUNK))
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        data.update(draw(st.dictionaries(st.text(max_size=12), JUNK, min_size=1, max_size=2)))
    return data


SAFE_FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PRIORITIES = st.one_of(st.sampled_from(list(Priority)), st.sampled_from(["HIGH", "urgent", ""]))


# --- JobSpec ----------------------------------------------------------------------------


def test_generated_job_specs_validate_or_are_refused(
    queue: JobQueue, redis_url: str, record_stat: Callable[..., None]
) -> None:
    seen: Counter[str] = Counter()
    raw = redis.Redis.from_url(redis_url)

    @FAST
    @given(data=spec_dicts(), priority=PRIORITIES)
    def check(data: dict[str, Any], priority: Any) -> None:
        seen["examples"] += 1
        try:
            spec = JobSpec.model_validate(data)
            prio = Priority(priority)
        except ValidationError:
            seen["refused_spec"] += 1
            return
        except ValueError as e:  # Priority("urgent"): an enum's own refusal
            assert "is not a valid Priority" in str(e)
            seen["refused_priority"] += 1
            return
        seen["accepted"] += 1
        job = queue.submit(spec, prio)
        got = queue.get(job.id)
        assert got.spec == spec and got.priority == prio
        stored = raw.hgetall(keys.job(job.id))
        for value in stored.values():
            assert not value.startswith(b"\x80"), "pickle protocol header"
            value.decode("utf-8")
        assert json.loads(stored[b"spec"]) == spec.model_dump(mode="json")
        # Given or derived from any model string, the output folder name is one plain
        # component (as documented: letters, digits, '.', '_', '-') inside models_dir.
        assert SAFE_FOLDER.fullmatch(spec.resolved_output_name()), repr(spec.resolved_output_name())
        root = queue.settings.models_dir.resolve()
        assert (
            publish.output_path(queue.settings.models_dir, spec.resolved_output_name()).parent
            == root
        )

    check()
    record_stat(
        "jobspec", examples=seen["examples"], **{k: v for k, v in seen.items() if k != "examples"}
    )
    assert seen["accepted"] > 0 and seen["refused_spec"] > 0, seen


NAME_FIELDS = {"model": "org/name", "calib_dataset": "allenai/c4", "output_name": "out"}


@st.composite
def name_fields(draw: st.DrawFn) -> tuple[str, Any]:
    """One name-like field: a good value with an odd ending, or a generated name."""
    field = draw(st.sampled_from([*NAME_FIELDS, "exclude"]))
    good = NAME_FIELDS.get(field, "*mlp*")
    value = draw(st.one_of(ENDS_ODDLY.map(lambda e: good + e), NAMES))
    return field, [value] if field == "exclude" else value


def test_generated_names_are_accepted_only_when_plain(
    queue: JobQueue, record_stat: Callable[..., None]
) -> None:
    """Names end up in folder names, log lines and `jobs show`: an accepted one has no line
    break, line separator or control character, and an output name is one plain folder
    name."""
    seen: Counter[str] = Counter()

    @FAST
    @given(case=name_fields())
    # Found by this test: `$` in the patterns matched before a final newline, and exclude
    # patterns took lone surrogates (non-UTF-8 argv) that `jobs show` could not print.
    @example(case=("output_name", "out\n"))
    @example(case=("exclude", ["*mlp*\udcff"]))
    @example(case=("model", "org/na\u2028me"))  # a line separator above ASCII, as \x85
    def check(case: tuple[str, Any]) -> None:
        field, value = case
        seen["examples"] += 1
        try:
            spec = JobSpec.model_validate({"model": "org/name", field: value})
        except ValidationError:
            seen["refused"] += 1
            return
        seen["accepted"] += 1
        texts = spec.exclude if field == "exclude" else [getattr(spec, field)]
        for text in texts:
            assert text.isprintable(), repr(text)  # no control or line-separator character
            text.encode("utf-8")  # printable in a UTF-8 terminal, storable as a Redis key
        if field == "output_name":
            assert SAFE_FOLDER.fullmatch(spec.resolved_output_name()), repr(value)
        if field == "exclude":
            assert all(p.isprintable() for p in spec.exclude), repr(value)
        assert queue.get(queue.submit(spec).id).spec == spec

    check()
    record_stat(
        "job_names", examples=seen["examples"], accepted=seen["accepted"], refused=seen["refused"]
    )
    assert seen["accepted"] > 0 and seen["refused"] > 0, seen


# --- corrupted job hashes ----------------------------------------------------------------

GARBAGE = st.one_of(
    st.text(max_size=60),
    st.binary(max_size=40),
    JUNK.map(json.dumps),
    st.sampled_from(
        ["", "null", "{", "[]", '{"model": 5}', '{"model": "a/b", "x": 1}', "\x80\x04"]
    ),
)


def test_corrupt_json_fields_fail_the_job_in_one_line(
    queue: JobQueue, redis_url: str, record_stat: Callable[..., None]
) -> None:
    seen: Counter[str] = Counter()
    raw = redis.Redis.from_url(redis_url)

    @FAST
    @given(field=st.sampled_from(["spec", "progress", "result"]), garbage=GARBAGE)
    def check(field: str, garbage: str | bytes) -> None:
        seen["examples"] += 1
        raw.flushall()
        job = queue.submit(JobSpec(model="org/name"))
        raw.hset(keys.job(job.id), field, garbage)
        try:
            queue.get(job.id)
            readable = True
        except CorruptJob as e:
            readable = False
            assert str(e).startswith(f"job {job.id} in Redis cannot be read: ")
            assert len(str(e).splitlines()) == 1
        for args in (["jobs", "show", job.id], ["jobs", "list"]):
            out = invoke(redis_url, args)
            assert_clean_exit(out)
            assert out.exit_code == (0 if readable else 1), out.output
        claimed = queue.claim("w-test")  # must never raise, whatever the hash holds
        if readable:
            seen["still_readable"] += 1
            assert claimed is not None and claimed.id == job.id
            return
        seen["corrupt"] += 1
        assert claimed is None  # nothing else is queued
        state, error, attempts = raw.hmget(keys.job(job.id), "state", "error", "attempts")
        assert state == b"failed" and attempts == b"1"
        assert error is not None and error.decode().endswith("; it was not run")
        assert len(error.decode().splitlines()) == 1
        assert raw.zscore(keys.ENDED, job.id) is not None
        assert raw.zcard(keys.RUNNING) == 0 and raw.zcard(keys.QUEUE) == 0

    check()
    record_stat("corrupt_job_hash", examples=seen["examples"], corrupt=seen["corrupt"])
    assert seen["corrupt"] > 0


def test_a_worker_process_fails_an_unreadable_job_and_runs_the_next(
    settings: Settings, redis_url: str, tmp_path: Path
) -> None:
    q = JobQueue(settings)
    bad = q.submit(JobSpec(model="org/name"))
    redis.Redis.from_url(redis_url).hset(keys.job(bad.id), "spec", b'{"model": 5')
    # The next job fails fast (no such folder) but only a worker that is still alive
    # can claim and run it.
    nxt = q.submit(JobSpec(model=str(tmp_path / "no-such-model")))
    workers = Workers(settings)
    try:
        proc = workers.start("--burst", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = proc.communicate(timeout=180)
    finally:
        workers.stop_all()
    log = out.decode(errors="replace")
    assert proc.returncode == 0, log
    assert "Traceback" not in log, log
    raw = redis.Redis.from_url(redis_url)
    error = raw.hget(keys.job(bad.id), "error")
    assert raw.hget(keys.job(bad.id), "state") == b"failed"
    assert error is not None and b"spec is not valid JSON" in error and b"\n" not in error
    done = wait_for(q, nxt.id, ended, timeout=10)
    assert done.state == JobState.FAILED and done.error and "does not exist" in done.error


# --- the CLI ------------------------------------------------------------------------------


def invoke(redis_url: str, args: list[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, args, env={"NVFP4_REDIS_URL": redis_url, **(env or {})})


def assert_clean_exit(out: Result) -> None:
    """0, 1 or 2; an error is one line without a traceback."""
    assert out.exit_code in (0, 1, 2), (out.exit_code, out.output)
    assert out.exception is None or isinstance(out.exception, SystemExit), repr(out.exception)
    assert "Traceback" not in out.output
    if out.exit_code != 0:
        lines = out.output.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error"), out.output


NUMBERS = st.one_of(
    st.integers(min_value=-2, max_value=100_001).map(str), NAMES, st.sampled_from(["1e3", "0x8"])
)


@st.composite
def submit_args(draw: st.DrawFn) -> tuple[list[str], str]:
    """`jobs submit` arguments: each option absent, good, or generated."""
    model = draw(st.one_of(GOOD["model"], NAMES))
    options: list[str] = []
    for flag, good, generated in (
        ("--format", "fp8", st.sampled_from(["int3", "NVFP4", ""])),
        ("--calib-dataset", "allenai/c4", NAMES),
        ("--calib-samples", "8", NUMBERS),
        ("--calib-seq-len", "64", NUMBERS),
        ("--eval-samples", "0", NUMBERS),
        ("--name", "out-1", st.one_of(NAMES, ENDS_ODDLY.map(lambda e: "out" + e))),
        ("--priority", "high", st.sampled_from(["urgent", "", "HIGH"])),
    ):
        choice = draw(st.integers(min_value=0, max_value=2))
        if choice:
            options.append(f"{flag}={good if choice == 1 else draw(generated)}")
    patterns = st.one_of(st.just("*mlp*"), NAMES, ENDS_ODDLY.map(lambda e: "*mlp*" + e))
    for pattern in draw(st.lists(patterns, max_size=2)):
        options.append(f"--exclude={pattern}")
    # "--" ends the options: MODEL is taken as given even when it starts with "-".
    return ["jobs", "submit", *options, "--", model], model


def test_cli_submit_with_generated_values(
    redis_url: str, queue: JobQueue, record_stat: Callable[..., None]
) -> None:
    seen: Counter[str] = Counter()

    @CLI
    @given(case=submit_args())
    def check(case: tuple[list[str], str]) -> None:
        args, model = case
        seen["examples"] += 1
        before = snapshot(redis_url)
        out = invoke(redis_url, args)
        assert_clean_exit(out)
        if out.exit_code != 0:
            seen["refused"] += 1
            assert snapshot(redis_url) == before, "a refused submit changed Redis"
            return
        seen["accepted"] += 1
        job_id = out.output.split()[1].rstrip(":")
        assert queue.get(job_id).spec.model == model
        shown = invoke(redis_url, ["jobs", "show", job_id])  # what was accepted can be shown
        assert_clean_exit(shown)
        assert shown.exit_code == 0
        assert queue.queue_depth() == sum(1 for k in before if k.startswith(b"nvfp4:job:")) + 1

    check()
    record_stat(
        "cli_submit", examples=seen["examples"], accepted=seen["accepted"], refused=seen["refused"]
    )
    assert seen["accepted"] > 0 and seen["refused"] > 0, seen


def _jobs_in_every_state(q: JobQueue) -> list[str]:
    queued = q.submit(JobSpec(model="org/queued"))
    running = q.submit(JobSpec(model="org/running"))
    failed = q.submit(JobSpec(model="org/failed"))
    cancelled = q.submit(JobSpec(model="org/cancelled"))
    done = q.submit(JobSpec(model="org/done"))
    q.cancel(cancelled.id)
    claimed = {}
    while (job := q.claim("w-test")) is not None:
        claimed[job.id] = job
    q.fail(claimed[failed.id], "w-test", "boom")
    result = JobResult(
        output_name="o", output_path="/m/o", source_bytes=2, output_bytes=1, duration_s=1
    )
    q.succeed(claimed[done.id], "w-test", result)
    q.requeue_own(claimed[queued.id], "w-test", "back", refund=True)
    q.log(running.id, "a line")
    return [queued.id, running.id, failed.id, cancelled.id, done.id]


@st.composite
def job_commands(draw: st.DrawFn, ids: list[str]) -> list[str]:
    job_id = draw(st.one_of(st.sampled_from(ids), NAMES))
    command = draw(st.sampled_from(["show", "cancel", "retry", "logs", "purge", "list"]))
    if command == "purge":
        duration = draw(st.one_of(NAMES, st.sampled_from(["0s", "7d", "1e400d", "9" * 400 + "w"])))
        return ["jobs", "purge", f"--older-than={duration}"]
    if command == "list":
        args = ["jobs", "list", f"--limit={draw(NUMBERS)}"]
        if draw(st.booleans()):
            args.append(f"--state={draw(st.sampled_from(['queued', 'failed', 'done', '']))}")
        return args
    extra = ["--json"] if command == "show" and draw(st.booleans()) else []
    return ["jobs", command, *extra, "--", job_id]


def test_cli_job_commands_with_generated_ids(
    redis_url: str, queue: JobQueue, record_stat: Callable[..., None]
) -> None:
    seen: Counter[str] = Counter()
    raw = redis.Redis.from_url(redis_url)
    raw.flushall()
    ids = _jobs_in_every_state(queue)

    # Ids are drawn from this list, so it is built once; each example starts from the same
    # Redis contents, restored from a dump.
    dumps = {key: raw.dump(key) for key in raw.scan_iter()}

    @CLI
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        raw.flushall()
        for key, value in dumps.items():
            raw.restore(key, 0, value)
        args = data.draw(job_commands(ids))
        seen["examples"] += 1
        before = snapshot(redis_url)
        out = invoke(redis_url, args)
        assert_clean_exit(out)
        seen[f"exit_{out.exit_code}"] += 1
        if out.exit_code != 0:
            assert snapshot(redis_url) == before, f"{args} failed but changed Redis"

    check()
    record_stat(
        "cli_job_commands",
        examples=seen["examples"],
        **{k: v for k, v in seen.items() if k.startswith("exit")},
    )
    assert seen["exit_0"] > 0 and seen["exit_1"] > 0, seen


# Each setting the CLI reads, with a value that works; the test mixes these with
# generated ones so that both outcomes happen.
GOOD_SETTINGS = {
    "NVFP4_SERVE_API_KEYS": '["k1"]',
    "NVFP4_MODEL_ROOTS": "[]",
    "NVFP4_MAX_ATTEMPTS": "3",
    "NVFP4_ENV": "development",
    "NVFP4_HEARTBEAT_TIMEOUT_S": "30",
    "NVFP4_SERVE_ENGINE_KWARGS": "{}",
}
BAD_SETTINGS = st.one_of(
    NAMES,
    st.sampled_from(
        [
            "redis://:pw@127.0.0.1:notaport/0",
            "redis://127.0.0.1:99999/0",
            "http://127.0.0.1:6379",
            "unix:///nonexistent.sock",
            "redis://127.0.0.1:9/0",
            "[1, 2]",
            '{"a": 1}',
            "-1",
            "0",
            "production",
        ]
    ),
)


@st.composite
def settings_env(draw: st.DrawFn) -> dict[str, str]:
    env = {}
    for name in draw(st.lists(st.sampled_from(sorted(GOOD_SETTINGS)), max_size=3, unique=True)):
        env[name] = draw(st.one_of(st.just(GOOD_SETTINGS[name]), BAD_SETTINGS))
    return env


def test_cli_settings_from_generated_values(
    redis_url: str, record_stat: Callable[..., None]
) -> None:
    seen: Counter[str] = Counter()

    @CLI
    @given(env=settings_env(), url_option=st.one_of(st.none(), st.none(), BAD_SETTINGS))
    def check(env: dict[str, str], url_option: str | None) -> None:
        seen["examples"] += 1
        if any("\x00" in v for v in [*env.values(), url_option or ""]):
            return  # no process can receive a NUL in its arguments or environment
        args = (["--redis-url", url_option] if url_option is not None else []) + ["jobs", "list"]
        out = CliRunner().invoke(cli, args, env={"NVFP4_REDIS_URL": redis_url, **env})
        assert_clean_exit(out)
        seen[f"exit_{out.exit_code}"] += 1

    check()
    record_stat(
        "cli_settings",
        examples=seen["examples"],
        **{k: v for k, v in seen.items() if k.startswith("exit")},
    )
    assert seen["exit_0"] > 0 and seen["exit_1"] > 0, seen
