"""One dependency specification: the README, CI (.ci/run) and the Dockerfile install the same
extras of pyproject.toml with the same constraints file (no Docker engine runs here, so the
Dockerfile is read, not built)."""

from __future__ import annotations

import re
import shlex

import pytest

from tests.cluster.localcluster import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

CONSTRAINTS = "constraints.txt"


def _section(text: str, title: str) -> str:
    start = text.index(f"\n{title}\n")
    nxt = re.search(r"\n#{2,3} ", text[start + len(title) + 2:])
    return text[start: start + len(title) + 2 + nxt.start()] if nxt else text[start:]


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def _pip_installs(command: str) -> list[list[str]]:
    """The argument lists of every `pip install` in a shell command line (split on && / ;)."""
    out = []
    for part in re.split(r"&&|;|\n", command):
        argv = shlex.split(part)
        for i, a in enumerate(argv):
            if a.endswith("pip") and argv[i + 1: i + 2] == ["install"]:
                out.append(argv[i + 2:])
    return out


def _spec(args: list[str]) -> tuple[str | None, str | None]:
    """(constraints file, editable target) of a pip install argument list; anything else that
    is not a quiet/cache flag is an error (a stray pin would split the specification)."""
    constraints = editable = None
    it = iter(args)
    for a in it:
        if a == "-c":
            constraints = next(it)
        elif a == "-e":
            editable = next(it)
        elif a in ("-q", "--no-cache-dir"):
            continue
        else:
            raise AssertionError(f"pip install argument outside the spec: {a!r} in {args}")
    return constraints, editable


def _readme() -> str:
    return (REPO / "README.md").read_text()


def _constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / CONSTRAINTS).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{CONSTRAINTS}: not an exact pin: {line!r}"
            pins[name.lower()] = version
    return pins


def test_readme_ci_and_dockerfile_install_the_same_spec():
    two = _section(_readme(), "## The two commands")
    blocks = [b.strip() for b in _bash_blocks(two)]
    main_job, tests = blocks[0], blocks[2]
    assert main_job.endswith("granet study plasticity studies/configs/plasticity_mnist1d.yaml")
    assert tests.endswith(".venv/bin/python -m pytest -q")

    # CI runs exactly the README's test command, and nothing else
    ci = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.startswith("#")]
    assert ci == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', tests]

    (main_install,) = _pip_installs(main_job)
    (test_install,) = _pip_installs(tests)
    assert _spec(main_install) == (CONSTRAINTS, ".")
    assert _spec(test_install) == (CONSTRAINTS, ".[dev]")

    docker = (REPO / "Dockerfile").read_text()
    runs = [ln for ln in docker.splitlines() if ln.startswith("RUN ")]
    (docker_install,) = [i for r in runs for i in _pip_installs(r[4:])]
    assert _spec(docker_install) == (CONSTRAINTS, ".[cluster]")
    # the image copies the constraints file before installing with it
    copied = [ln for ln in docker.splitlines() if ln.startswith("COPY ")]
    assert any(CONSTRAINTS in ln.split() for ln in copied[:1]), copied

    # the README's cluster section installs the launcher side with the image's spec
    cluster = _section(_readme(), "### On a cluster")
    launcher = [i for b in _bash_blocks(cluster) for i in _pip_installs(b)]
    assert [_spec(i) for i in launcher] == [(CONSTRAINTS, ".[cluster]")]


def test_torch_and_ray_pins_are_in_one_place():
    pins = _constraint_pins()
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    # (no install command pins anything by itself: _spec refuses any argument but -c / -e)
    # the image's Ray is the pinned Ray, inside pyproject's range
    base = re.search(r"^FROM rayproject/ray:(\S+?)-", (REPO / "Dockerfile").read_text(), re.M)
    assert base and base.group(1) == pins["ray"]
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_dep = next(d for d in deps if d.startswith("ray["))
    assert ray_dep == "ray[tune]>=2.60,<2.61" and pins["ray"].startswith("2.60.")


def test_extras():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    names = {e: {re.split(r"[\[<>=!~ ]", d, maxsplit=1)[0].lower() for d in deps}
             for e, deps in extras.items()}
    # the job API / dashboard, MLflow's S3 store, a Postgres driver
    assert {"ray", "boto3", "psycopg"} <= names["cluster"]
    assert "ray[default]>=2.60,<2.61" in extras["cluster"]
    assert "psycopg[binary]>=3.1" in extras["cluster"]
    # dev = cluster + the test tools (the two-node test needs `ray job`)
    assert "granet[cluster]" in extras["dev"]
    assert {"pytest", "ruff", "jsonschema", "moto", "psutil"} <= names["dev"]
