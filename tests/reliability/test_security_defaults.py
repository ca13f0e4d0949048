"""Security defaults hold for generated input and across real processes.

(a) No pickle anywhere in Redis after a full flow through the queue API (submit, claim,
    heartbeats, progress, log lines, fail, retry, cancel, succeed, a dead worker's job
    reaped, graceful re-queue, serve history), with generated text in every free-text
    field: every value of every key of every type is UTF-8 text, never a pickle header.
    The same holds after a real worker and the CLI ran (b). (tests/integration/
    test_queue.py checks hashes and lists after one submit and claim.)
(b) Secrets never leave: the CLI (jobs, workers, doctor, serve, --debug, invalid settings)
    and a worker process run against a password-protected Redis with API keys, a Ray
    token and HF_TOKEN set; none of them shows up in any output, log or Redis value.
    mask_url hides any generated password.
(c) Paths: generated names made of "..", ".", "/", "%2e%2e", "~", symlinks (one pointing
    outside), NUL and newlines are accepted as a model, calibration data or output name
    only when the resolved path stays inside an allowed root.
(d) Model sources: a name that is not a local folder is used only when it is a plain
    Hugging Face id; anything else is refused in one line before the hub is asked.
(e) Production refuses a Redis URL without a password, for any URL. The other halves are
    tested elsewhere: the development default URL (tests/integration/test_queue.py),
    serving without API keys (tests/unit/test_auth.py, tests/integration/test_serve.py)
    and the CLI's one-line refusal (tests/unit/test_cli_help.py).
"""

from __future__ import annotations

import json
import os
import secrets
import string
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError

from nvfp4_admin.cli import cli
from nvfp4_common import keys
from nvfp4_common.jobs import HF_ID, JobResult, JobSpec, JobState, Priority, Progress, Stage
from nvfp4_common.queue import JobQueue
from nvfp4_common.serve_history import ServeHistory
from nvfp4_common.settings import Settings, mask_url
from nvfp4_worker import publish, sources
from nvfp4_worker.errors import JobError
from tests.conftest import RedisServer
from tests.reliability.redis_contents import stored_values

pytestmark = pytest.mark.timeout(300)

PROPERTY = hypothesis_settings(
    max_examples=150,
    deadline=None,
    database=None,  # no .hypothesis folder in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def assert_plain_text(url: str) -> int:
    """Every stored value is UTF-8 text and none is a pickle; returns how many were read."""
    n = 0
    for key, value in stored_values(url):
        n += 1
        assert not value.startswith(b"\x80"), f"pickle protocol header in {key!r}"
        value.decode("utf-8")
    return n


# --- (a) no pickle ------------------------------------------------------------------------

# Serve configs carry arbitrary builder args (JSON).
JSON_OBJECTS = st.dictionaries(
    st.text(max_size=10),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
        max_leaves=8,
    ),
    max_size=4,
)
FLOW = hypothesis_settings(PROPERTY, max_examples=40)  # each example is a whole flow


def test_no_pickle_anywhere_after_a_full_flow(
    settings: Settings, redis_url: str, record_stat: Callable[..., None]
) -> None:
    seen: Counter[str] = Counter()
    raw = redis.Redis.from_url(redis_url)
    quick = settings.model_copy(update={"heartbeat_timeout_s": 0.01})

    @FLOW
    @given(text=st.lists(st.text(max_size=80), min_size=5, max_size=5), args=JSON_OBJECTS)
    def check(text: list[str], args: dict[str, object]) -> None:
        seen["examples"] += 1
        raw.flushall()
        q = JobQueue(settings)
        a = q.submit(JobSpec(model="org/a", exclude=["*mlp*"], output_name="a-out"), Priority.HIGH)
        b = q.submit(JobSpec(model="/models/b", calib_dataset="org/data:en"), Priority.LOW)
        c = q.submit(JobSpec(model="org/c"))
        d = q.submit(JobSpec(model="org/d"))
        job = q.claim("w1")
        assert job is not None and job.id == a.id
        q.beat_worker("w1", "host-1", 101, job.id)
        assert q.heartbeat(job, "w1")
        q.set_progress(job, Progress(stage=Stage.CALIBRATING, fraction=0.5, message=text[0]))
        q.log(job.id, text[1])
        q.fail(job, "w1", text[2])
        q.retry(a.id)
        q.cancel(d.id)
        job = q.claim("w2")  # a again: high priority
        assert job is not None
        result = JobResult(
            output_name="a-out",
            output_path=text[3] or "/m",
            source_bytes=10,
            output_bytes=3,
            perplexity_base=1.5,
            duration_s=0.1,
        )
        q.succeed(job, "w2", result)
        job = q.claim("w2")  # c
        assert job is not None
        q.requeue_own(job, "w2", "shutting down", refund=True)
        # A worker that dies: its deadline passes and another worker's reap re-queues it.
        lost = JobQueue(quick).claim("w3")
        assert lost is not None
        time.sleep(0.02)
        assert q.reap()
        history = ServeHistory(q.redis)
        history.push({"applications": [{"name": text[4], "args": args}]})
        q.purge(older_than_s=3600)
        seen["values_read"] += assert_plain_text(redis_url)
        for key in raw.scan_iter(keys.JOB + "*"):
            for field in (b"spec", b"progress", b"result"):
                value = raw.hget(key, field)
                if value:
                    json.loads(value)
        assert history.configs()[0]["applications"][0]["args"] == args
        assert {j.id for j in q.jobs(JobState.QUEUED)} == {b.id, c.id}  # the flow ran as planned

    check()
    record_stat("no_pickle_flow", examples=seen["examples"], values_read=seen["values_read"])


# --- (b) secrets --------------------------------------------------------------------------

PASSWORD = "pw-" + secrets.token_hex(12)
API_KEY = "sk-" + secrets.token_hex(12)
RAY_TOKEN = "ray-" + secrets.token_hex(12)
HF_TOKEN = "hf_" + secrets.token_hex(12)
SECRETS = (PASSWORD, API_KEY, RAY_TOKEN, HF_TOKEN)
NO_SERVICE = "http://127.0.0.1:9"  # nothing listens: the commands report it in one line


@pytest.fixture
def secret_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", password=PASSWORD)
    server.start()
    yield server
    server.stop()


def secret_env(server: RedisServer, workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NVFP4_", "HF_"))}
    env.update(
        {
            "NVFP4_REDIS_URL": server.url,
            "NVFP4_SERVE_API_KEYS": json.dumps([API_KEY]),
            "NVFP4_RAY_AUTH_TOKEN": RAY_TOKEN,
            "HF_TOKEN": HF_TOKEN,
            "NVFP4_RAY_ADDRESS": NO_SERVICE,
            "NVFP4_SERVE_URL": NO_SERVICE,
            "NVFP4_MODELS_DIR": str(workdir / "models"),
            "NVFP4_HF_OFFLINE": "true",
            "HF_HUB_OFFLINE": "1",
            "NVFP4_HEARTBEAT_INTERVAL_S": "0.2",
        }
    )
    return env


def run_process(argv: list[str], env: dict[str, str], cwd: Path) -> str:
    """A real process; its exit code, stdout and stderr."""
    out = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=180)
    return f"--- exit {out.returncode}\n{out.stdout}\n{out.stderr}"


def run_cli(args: list[str], env: dict[str, str]) -> str:
    """nvfp4ctl in this process (it configures no logging of its own, so this is all it
    prints); an exception that escapes is rendered as Python would print it."""
    out = CliRunner().invoke(cli, args, env=env)
    text = f"--- exit {out.exit_code}\n{out.output}"
    if out.exc_info and not isinstance(out.exception, SystemExit):
        text += "".join(traceback.format_exception(*out.exc_info))
    return text


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a secret ({secret[:3]}...) appears in:\n{text[-3000:]}"


WORKER = [sys.executable, "-m", "nvfp4_worker", "--burst"]


def test_secrets_never_appear_in_output_logs_or_redis(
    secret_redis: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    record_stat: Callable[..., None],
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env of the repository
    env = secret_env(secret_redis, tmp_path)
    submitted = CliRunner().invoke(
        cli, ["jobs", "submit", str(tmp_path / "no-model"), "--json"], env=env
    )
    assert submitted.exit_code == 0, submitted.output
    job_id = json.loads(submitted.output)["id"]
    outputs = [submitted.output]
    # A real worker runs the job (it fails: no such folder), logging at INFO.
    outputs.append(run_process(WORKER, env, tmp_path))
    for args in (
        ["jobs", "list"],
        ["jobs", "list", "--json"],
        ["jobs", "show", job_id],
        ["jobs", "show", job_id, "--json"],
        ["jobs", "logs", job_id],
        ["workers", "list", "--json"],
        ["doctor"],
        ["serve", "status"],
        ["--debug", "jobs", "show", "nope"],  # a traceback
        ["--redis-url", secret_redis.url, "jobs", "retry", job_id],  # the URL as an option
    ):
        outputs.append(run_cli(args, env))
    # Settings refused in production (this Redis URL has no password): the error names the
    # problem, not the inputs, which include the keys and the token.
    bad = {**env, "NVFP4_ENV": "production", "NVFP4_REDIS_URL": "redis://127.0.0.1:9/0"}
    outputs.append(run_cli(["jobs", "list"], bad))
    outputs.append(run_process(WORKER, bad, tmp_path))
    # The keys given in the wrong shape: pydantic's own message would quote them.
    shape = {**env, "NVFP4_SERVE_API_KEYS": json.dumps({"main": API_KEY})}
    outputs.append(run_cli(["jobs", "list"], shape))
    outputs.append(run_process(WORKER, shape, tmp_path))
    # A wrong password in the URL is not echoed either.
    wrong = {**env, "NVFP4_REDIS_URL": secret_redis.url.replace(PASSWORD, PASSWORD[::-1])}
    outputs.append(run_cli(["jobs", "list"], wrong))

    text = "\n".join(outputs)
    assert_no_secret(text)
    assert PASSWORD[::-1] not in text
    # The commands did their work, so their output was worth checking.
    assert "worker" in text and "started (redis redis://:***@127.0.0.1" in text
    assert "does not exist" in text  # the job ran and failed
    assert text.count("invalid settings: settings: NVFP4_REDIS_URL must be set in production") == 2
    assert text.count("serve_api_keys: Input should be a valid list") == 2
    assert "refused the password" in text
    assert "Traceback" in text and "JobNotFound" in text  # --debug
    values = list(stored_values(secret_redis.url))
    assert_no_secret("\n".join(v.decode() for _, v in values))
    assert_plain_text(secret_redis.url)
    record_stat("secrets", commands=len(outputs), redis_values=len(values))


# What a password may be pasted as: URL-encoded, or raw (base64 brings "/" and "+";
# a URL then misparses, but the log line must still hide all of it).
RAW_PASSWORD = st.text(
    alphabet=string.ascii_letters + string.digits + "/+=!$&'()*,;:@%-._~?#", min_size=1
)


def test_mask_url_hides_any_password(record_stat: Callable[..., None]) -> None:
    seen: Counter[str] = Counter()

    @PROPERTY
    @given(
        password=st.one_of(st.text(min_size=1).map(lambda p: quote(p, safe="")), RAW_PASSWORD),
        user=st.sampled_from(["", "default"]),
    )
    @example(password="ab/cd+ef==", user="")  # found by this test: the tail after "/" leaked
    @example(password="p@ss#w0rd?", user="")
    def check(password: str, user: str) -> None:
        seen["examples"] += 1
        masked = mask_url(f"redis://{user}:{password}@redis:6379/0")
        assert masked == f"redis://{user}:***@redis:6379/0"

    check()
    record_stat("mask_url", examples=seen["examples"])


# --- (c) paths ---------------------------------------------------------------------------


def fake_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Settings, Path, Path]:
    """Allowed roots (models, hub, extra) and an outside folder, each with a model and a
    text file; symlinks in models/ point inside, outside, and at themselves. The working
    directory is this tree, so relative names resolve here."""
    models, outside = tmp_path / "models", tmp_path / "outside"
    for folder in (models / "x", outside / "x", tmp_path / "extra" / "y"):
        fake_model(folder)
    (tmp_path / "hub").mkdir()
    (outside / "secret.txt").write_text("do not read")
    (models / "data.txt").write_text("calibration text")
    (models / "link-out").symlink_to(outside / "x")
    (models / "link-in").symlink_to(models / "x")
    (models / "leak.txt").symlink_to(outside / "secret.txt")
    (models / "loop").symlink_to(models / "loop")
    monkeypatch.chdir(tmp_path)
    cfg = Settings(
        models_dir=models,
        hf_cache_dir=tmp_path / "hub",
        model_roots=[tmp_path / "extra"],
        hf_offline=True,
        _env_file=None,  # type: ignore[call-arg]
    )
    return cfg, tmp_path, outside


PARTS = st.sampled_from(
    [
        "models",
        "outside",
        "extra",
        "x",
        "y",
        "link-out",
        "link-in",
        "loop",
        "data.txt",
        "leak.txt",
        "secret.txt",
        "..",
        ".",
        "",
        "%2e%2e",
        "~",
        "\n",
        "\x00",
        "nope",
    ]
)
PATHS = st.one_of(
    st.lists(PARTS, min_size=1, max_size=6).map("/".join),
    # Mostly plausible names under models/, so that accepted ones are common too.
    st.lists(st.sampled_from(["x", "link-in", "link-out", "data.txt", ".", ".."]), max_size=3).map(
        lambda p: "/".join(["models", *p])
    ),
    st.sampled_from(["models/x", "extra/y", "models/data.txt", "fresh-name", "out.v2"]),
    st.lists(PARTS, min_size=1, max_size=6).map(lambda p: "/" + "/".join(p)),
    st.sampled_from(["/etc", "/etc/passwd", "/", "~", "~/x", "/root", "/proc/self/environ"]),
)


# Names that should be accepted for each use, so that both outcomes are common.
GOOD_PATHS = {
    "model": ["models/x", "models/link-in", "extra/y", "models/./x", "models/x/../x"],
    "calibration": ["models/data.txt", "models/./data.txt", "extra/../models/data.txt"],
    "output": ["fresh-name", "out.v2", "a_b-c"],
}


@st.composite
def named(draw: st.DrawFn) -> tuple[str, str]:
    what = draw(st.sampled_from(sorted(GOOD_PATHS)))
    return what, draw(st.one_of(PATHS, st.sampled_from(GOOD_PATHS[what])))


def _inside(path: Path, cfg: Settings) -> bool:
    return any(path.resolve().is_relative_to(root) for root in sources.allowed_roots(cfg))


def test_paths_are_accepted_only_inside_the_roots(
    tree: tuple[Settings, Path, Path], record_stat: Callable[..., None]
) -> None:
    cfg, base, outside = tree
    seen: Counter[str] = Counter()

    @PROPERTY
    @given(case=named(), absolute=st.booleans())
    @example(case=("model", "models/link-out"), absolute=False)
    @example(case=("calibration", "models"), absolute=False)  # holds leak.txt
    @example(case=("output", "link-out"), absolute=False)
    @example(case=("model", "models/../outside/x"), absolute=True)
    def check(case: tuple[str, str], absolute: bool) -> None:
        what, name = case
        seen["examples"] += 1
        if absolute and not name.startswith("/"):
            name = f"{base}/{name}"
        try:
            if what == "output":
                spec = JobSpec(model="org/name", output_name=name)
                final = publish.output_path(cfg.models_dir, spec.resolved_output_name())
                assert publish.existing_report(final, "job-1") is None
                resolved = [final]
            elif what == "model":
                spec = JobSpec(model=name)
                source = sources.resolve_model(spec.model, cfg)
                assert source.hub_id is None  # offline: nothing comes from the hub here
                resolved = [source.path]
            else:
                spec = JobSpec(model="org/name", calib_dataset=name)
                calib = sources.resolve_calibration(spec.calib_dataset, cfg)
                if calib.hub_id is not None:
                    seen["hub dataset"] += 1  # not a path: streamed later, refused offline
                    return
                resolved = list(calib.files)
        except ValidationError:
            seen["refused at submit"] += 1
            return
        except JobError as e:
            assert "\n" not in str(e)
            seen["refused by the worker"] += 1
            return
        seen["accepted"] += 1
        for path in resolved:
            if what == "output":  # one new folder directly inside models_dir
                assert path.parent == cfg.models_dir.resolve() and not path.exists(), name
                path = path.parent
            assert _inside(path, cfg), (what, name, path)
            assert not path.resolve().is_relative_to(outside.resolve()), (what, name, path)

    check()
    record_stat("paths", **seen)
    assert seen["accepted"] > 0 and seen["refused by the worker"] > 0, seen


# --- (d) Hugging Face ids ---------------------------------------------------------------

ID_CHARS = st.sampled_from(
    list("abcXYZ019._-")
    + ["--", "..", "@", "#", "?", "%", ":", " ", "~", "*", "\\", "/", "\t", "é"]
)
IDS = st.one_of(
    st.tuples(
        st.lists(ID_CHARS, min_size=1, max_size=8), st.lists(ID_CHARS, min_size=1, max_size=8)
    ).map(lambda t: "".join(t[0]) + "/" + "".join(t[1])),
    st.text(max_size=30),
)


# How sources.py words the errors of a name it looked up on the hub (or its cache).
HUB_PHRASES = (
    "local Hugging Face cache and",
    "not a valid Hugging Face id",
    "on the Hugging Face hub",
)


def test_model_names_reach_the_hub_only_as_plain_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record_stat: Callable[..., None]
) -> None:
    monkeypatch.chdir(tmp_path)  # an empty folder: no name is a local path
    cfg = Settings(
        models_dir=tmp_path / "models",
        hf_cache_dir=tmp_path / "hub",
        hf_offline=True,
        _env_file=None,  # type: ignore[call-arg]
    )
    seen: Counter[str] = Counter()

    @PROPERTY
    @given(name=IDS)
    # Plain by our pattern but refused by huggingface_hub's own rules: these used to escape
    # as an HFValidationError ("internal error") instead of a one-line JobError.
    @example(name="org/a..b")
    @example(name="org/x--y")
    @example(name="org/name.")
    @example(name="org/name\n")
    def check(name: str) -> None:
        seen["examples"] += 1
        try:
            spec = JobSpec(model=name)
            sources.resolve_model(spec.model, cfg)
        except ValidationError:
            seen["refused at submit"] += 1
            return
        except JobError as e:
            message = str(e)
            assert "\n" not in message
            if any(phrase in message for phrase in HUB_PHRASES):
                assert HF_ID.fullmatch(name), name  # only plain ids are looked up
                seen["looked up (offline)"] += 1
            else:
                seen["refused as a path"] += 1
            return
        raise AssertionError(f"{name!r} resolved to a model in an empty tree")

    check()
    record_stat("hub_ids", **seen)
    assert seen["looked up (offline)"] > 0 and seen["refused as a path"] > 0, seen


# --- (e) production ---------------------------------------------------------------------


def test_production_accepts_a_redis_url_only_with_a_password(
    record_stat: Callable[..., None],
) -> None:
    seen: Counter[str] = Counter()

    @PROPERTY
    @given(
        scheme=st.sampled_from(["redis", "rediss"]),
        user=st.sampled_from(["", "default"]),
        password=st.one_of(st.just(""), st.text(alphabet="abcXYZ0189-_~.", min_size=1)),
        has_auth=st.booleans(),
        host=st.sampled_from(["redis", "127.0.0.1", "redis.example.com"]),
    )
    def check(scheme: str, user: str, password: str, has_auth: bool, host: str) -> None:
        seen["examples"] += 1
        auth = f"{user}:{password}@" if has_auth else ""
        url = f"{scheme}://{auth}{host}:6379/0"
        try:
            Settings(env="production", redis_url=url, _env_file=None)  # type: ignore[call-arg]
            accepted = True
        except ValidationError:
            accepted = False
        assert accepted == bool(has_auth and password), url
        seen["accepted" if accepted else "refused"] += 1

    check()
    record_stat("production_redis_url", **seen)
