"""Damaged checkpoints get one clear error naming the file, never a crash loop.

Starting from a real NVFP4 checkpoint exported by the worker's pipeline, each case damages
one copy: a shard cut in half, a safetensors header of garbage, a header length beyond the
file, hf_quant_config.json that is not JSON / names an unknown algorithm / lacks its
quantization section / has group_size 32, no tokenizer, no config.json, config.json that
is not JSON, an empty folder. Then:

- the serving-side validation (nvfp4_common.checkpoint_files.check_folder, which
  build_app runs before it creates any deployment) raises CheckpointError with one line
  naming the file and the problem; build_app itself refuses each one in the serving
  interpreter (.venv-serve);
- `nvfp4ctl serve deploy` refuses it before it reaches Ray or touches Redis (the rollback
  history), with the same line;
- a quantization job whose source is a damaged local folder (a cut-short shard, no
  tokenizer) ends `failed` with one line, and the worker goes on.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from nvfp4_admin.cli import cli
from nvfp4_common.checkpoint_files import CheckpointError, check_folder
from nvfp4_common.jobs import JobResult, JobSpec, JobState
from nvfp4_common.queue import JobQueue
from nvfp4_common.settings import Settings
from nvfp4_serve.checkpoint import inspect_checkpoint
from tests.reliability.redis_contents import snapshot
from tests.serve_harness import SERVE_PYTHON, make_test_models, serve_env_available
from tests.worker_harness import Workers, ended, wait_for

pytestmark = pytest.mark.timeout(600)

SHARD = "model.safetensors"
# Nothing listens here: a command that got past the checkpoint check fails on Ray instead.
NO_RAY = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(BF16 source, NVFP4 checkpoint) made once by the real quantization pipeline."""
    return make_test_models(tmp_path_factory.mktemp("exported"))


# --- the damage ---------------------------------------------------------------------------


def cut_shard_in_half(folder: Path) -> None:
    shard = folder / SHARD
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)


def garbage_header(folder: Path) -> None:
    shard = folder / SHARD
    with shard.open("r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        f.write(b"{not json" + b"\x00" * (length - 9))  # same length, so only the JSON is bad


def header_longer_than_file(folder: Path) -> None:
    with (folder / SHARD).open("r+b") as f:
        f.write(struct.pack("<Q", 2**40))


def edit_quant_config(change: Callable[[dict], dict]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        file = folder / "hf_quant_config.json"
        file.write_text(json.dumps(change(json.loads(file.read_text()))))

    return apply


def quant_config_not_json(folder: Path) -> None:
    (folder / "hf_quant_config.json").write_text("{'quantization': {'quant_algo': 'NVFP4'")


def no_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()


def no_config(folder: Path) -> None:
    (folder / "config.json").unlink()


def config_not_json(folder: Path) -> None:
    (folder / "config.json").write_text('{"model_type": "qwen3",')


def emptied(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.mkdir()


def _set(section: dict, **values: object) -> dict:
    return {**section, "quantization": {**section["quantization"], **values}}


# case -> (damage, file named in the error, problem named in the error)
CASES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "shard cut in half": (cut_shard_in_half, SHARD, "is truncated: its header describes"),
    "garbage header": (garbage_header, SHARD, "damaged header (not safetensors JSON)"),
    "header length past the end": (header_longer_than_file, SHARD, "damaged header (length"),
    "quant config not JSON": (quant_config_not_json, "hf_quant_config.json", "not valid JSON"),
    "unknown quant_algo": (
        edit_quant_config(lambda c: _set(c, quant_algo="INT3")),
        "",  # the folder is named: the algorithm, not the file, is the problem
        "is ModelOpt INT3; vLLM serves only",
    ),
    "no quantization section": (
        edit_quant_config(lambda c: {"producer": c["producer"]}),
        "hf_quant_config.json",
        "has no 'quantization' section",
    ),
    "group_size 32": (
        edit_quant_config(lambda c: _set(c, group_size=32)),
        "hf_quant_config.json",
        "NVFP4 needs group_size 16, not 32",
    ),
    "no tokenizer": (no_tokenizer, "", "has no tokenizer (none of tokenizer.json"),
    "no config.json": (no_config, "", "has no config.json"),
    "config not JSON": (config_not_json, "config.json", "not valid JSON"),
    "empty folder": (emptied, "", "has no config.json"),
}


def damaged_copy(exported: tuple[Path, Path], base: Path, case: str) -> Path:
    folder = base / case.replace(" ", "-")
    shutil.copytree(exported[1], folder)
    CASES[case][0](folder)
    return folder


def expected(folder: Path, case: str) -> tuple[str, str]:
    _, file, problem = CASES[case]
    return str(folder / file) if file else str(folder), problem


# --- serving-side validation ----------------------------------------------------------------


def test_the_real_checkpoints_pass(exported: tuple[Path, Path]) -> None:
    bf16, nvfp4 = exported
    check_folder(bf16)
    check_folder(nvfp4)
    assert inspect_checkpoint(nvfp4).vllm_quantization == "modelopt_fp4"


@pytest.mark.parametrize("case", list(CASES))
def test_damage_is_named_in_one_line(
    exported: tuple[Path, Path], tmp_path: Path, case: str
) -> None:
    folder = damaged_copy(exported, tmp_path, case)
    where, problem = expected(folder, case)
    with pytest.raises(CheckpointError) as err:
        check_folder(folder)
    message = str(err.value)
    assert message.startswith(where) and problem in message, message
    assert "\n" not in message
    if not case.startswith(("shard", "garbage", "header", "no tokenizer")):
        # The JSON and quantization checks are also what inspect_checkpoint applies (it
        # reads those files for the engine config), so it refuses with the same line.
        with pytest.raises(CheckpointError) as again:
            inspect_checkpoint(folder)
        assert str(again.value) == message


@pytest.mark.skipif(not serve_env_available(), reason="needs .venv-serve (make install-serve)")
def test_build_app_refuses_each_damaged_checkpoint(
    exported: tuple[Path, Path], tmp_path: Path, record_stat: Callable[..., None]
) -> None:
    folders = {case: str(damaged_copy(exported, tmp_path, case)) for case in CASES}
    folders["intact"] = str(exported[1])
    # One interpreter for every case: importing Ray Serve LLM takes most of the time.
    code = """
import json, sys
from nvfp4_common.settings import Settings
from nvfp4_serve.app import build_app_with
settings = Settings(_env_file=None)
for case, folder in json.loads(sys.argv[1]).items():
    try:
        build_app_with(settings, {"model": folder, "accelerator": "cpu", "preflight": False})
        error = None
    except ValueError as e:
        error = str(e)
    print("RESULT " + json.dumps({"case": case, "error": error}), flush=True)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVFP4_")}
    out = subprocess.run(
        [str(SERVE_PYTHON), "-c", code, json.dumps(folders)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = {
        r["case"]: r["error"]
        for r in (
            json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")
        )
    }
    assert results.pop("intact") is None
    assert set(results) == set(CASES)
    for case, error in results.items():
        where, problem = expected(Path(folders[case]), case)
        assert error and error.startswith(where) and problem in error, (case, error)
    record_stat("damaged_checkpoints", cases=len(results), refused_by_build_app=len(results))


# --- nvfp4ctl serve deploy ----------------------------------------------------------------


def deploy(redis_url: str, *args: str) -> tuple[int, str]:
    env = {"NVFP4_REDIS_URL": redis_url, "NVFP4_RAY_ADDRESS": NO_RAY, "NVFP4_SERVE_URL": NO_RAY}
    out = CliRunner().invoke(cli, ["serve", "deploy", *args, "--timeout", "5"], env=env)
    assert out.exception is None or isinstance(out.exception, SystemExit), repr(out.exception)
    return out.exit_code, out.output


@pytest.mark.parametrize("case", list(CASES))
def test_deploy_refuses_before_touching_anything(
    exported: tuple[Path, Path], tmp_path: Path, redis_url: str, case: str
) -> None:
    folder = damaged_copy(exported, tmp_path, case)
    where, problem = expected(folder, case)
    before = snapshot(redis_url)
    code, output = deploy(redis_url, "--model", str(folder))
    assert code == 1
    assert output.startswith(f"Error: {where}") and problem in output, output
    assert output.count("\n") == 1
    assert NO_RAY not in output  # refused before any request to Ray
    assert snapshot(redis_url) == before  # no rollback entry, nothing else


def test_deploy_of_a_job_whose_output_was_damaged(
    exported: tuple[Path, Path], tmp_path: Path, redis_url: str, queue: JobQueue
) -> None:
    folder = damaged_copy(exported, tmp_path, "shard cut in half")
    job = queue.submit(JobSpec(model="org/name"))
    claimed = queue.claim("w-test")
    assert claimed is not None
    result = JobResult(
        output_name=folder.name,
        output_path=str(folder),
        source_bytes=2,
        output_bytes=1,
        duration_s=1,
    )
    queue.succeed(claimed, "w-test", result)
    code, output = deploy(redis_url, "--job", job.id)
    assert code == 1 and "is truncated" in output and NO_RAY not in output, output


def test_deploy_of_an_intact_checkpoint_goes_on_to_ray(
    exported: tuple[Path, Path], redis_url: str
) -> None:
    # The control: the same command with the real checkpoint passes the check and then
    # fails only because no Ray is running, so the refusals above come from the check.
    code, output = deploy(redis_url, "--model", str(exported[1]))
    assert code == 1 and f"cannot reach {NO_RAY}" in output, output


# --- the worker -------------------------------------------------------------------------


def test_worker_fails_jobs_on_damaged_sources_and_goes_on(
    exported: tuple[Path, Path],
    settings: Settings,
    calib_file: Path,
    tmp_path: Path,
    record_stat: Callable[..., None],
) -> None:
    sources = tmp_path / "sources"
    cut = sources / "cut-short"
    shutil.copytree(exported[0], cut)
    cut_shard_in_half(cut)
    tokenless = sources / "no-tokenizer"
    shutil.copytree(exported[0], tokenless)
    no_tokenizer(tokenless)
    job_settings = settings.model_copy(update={"model_roots": [sources, calib_file.parent]})
    q = JobQueue(job_settings)
    small = {"calib_dataset": str(calib_file), "calib_samples": 2, "calib_seq_len": 32}
    jobs = {
        "cut-short": (q.submit(JobSpec(model=str(cut), **small)), f"{SHARD} cannot be read"),
        "no tokenizer": (
            q.submit(JobSpec(model=str(tokenless), **small)),
            "has no tokenizer (none of tokenizer.json",
        ),
    }
    workers = Workers(job_settings)
    try:
        proc = workers.start("--burst", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        log, _ = proc.communicate(timeout=300)
    finally:
        workers.stop_all()
    assert proc.returncode == 0, log.decode(errors="replace")[-3000:]
    for name, (job, problem) in jobs.items():
        done = wait_for(q, job.id, ended, timeout=10)
        assert done.state == JobState.FAILED, (name, done.state)
        assert done.error and problem in done.error and "\n" not in done.error, (name, done.error)
        assert done.attempts == 1  # bad input is not retried
    assert list(job_settings.models_dir.iterdir()) == []  # no output, no temp folder
    assert redis.Redis.from_url(settings.redis_url).zcard("nvfp4:running") == 0
    record_stat("damaged_sources", jobs=len(jobs), failed_cleanly=len(jobs))
