"""The light host install: `esperd-host` alone, in a fresh venv without torch, talks to a broker.

Nothing is downloaded. The wheel is built from hostclient/ (copied with its symlinks resolved, so
the build sees esperd's own files and writes nothing into the source tree); its dependencies are
the msgspec and nats-py this test runs with, copied file by file into the fresh venv with their
metadata. The host wheel is then installed with `--no-index` and without `--no-deps`, so pip
itself checks that what the wheel requires is exactly what is there: a torch requirement would
fail the install.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from esperd.ops.natsserver import NatsServer
from esperd_contracts import Channel, Codec, HealthBatch, run_subject

pytestmark = pytest.mark.slow  # two wheel builds, a venv and a pip install: seconds

ROOT = Path(__file__).resolve().parents[2]
HOST_DEPENDENCIES = ("msgspec", "nats-py")

# Run in the fresh venv: connect HostClient to the broker, publish one health batch, report what
# got imported. torch must be neither importable there nor imported by the host side.
HOST_SCRIPT = """
import asyncio, importlib.util, json, sys

from esperd_contracts import HealthSignal
from esperd_host import HostClient, __version__


async def main(url: str) -> None:
    client = await HostClient.connect(url, "light-host", max_reconnect_attempts=0)
    client.send_health([HealthSignal(layer_id=3, health_score=0.25)])
    await client.flush()
    await client.close()


asyncio.run(main(sys.argv[1]))
print(json.dumps({
    "version": __version__,
    "torch_importable": importlib.util.find_spec("torch") is not None,
    "loaded": sorted(m for m in ("torch", "numpy", "esperd") if m in sys.modules),
    "client_file": sys.modules["esperd_host.client"].__file__,
}))
"""


def build_wheel(source: Path, out: Path) -> Path:
    """`pip wheel` of `source` into `out`, offline, with this environment's setuptools."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--isolated", "--no-index", "--no-deps"]
        + ["--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = out.glob("*.whl")
    return wheel


def requirement_names(dist: str) -> Iterator[str]:
    """`dist` and, recursively, what it requires unconditionally (extras left out)."""
    seen: set[str] = set()
    todo = [dist]
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        yield name
        for requirement in importlib.metadata.requires(name) or []:
            if "extra ==" not in requirement and "python_version <" not in requirement:
                todo.append(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0])


def copy_distribution(name: str, site: Path) -> None:
    """Install an already installed distribution into `site` by copying its recorded files."""
    dist = importlib.metadata.distribution(name)
    for file in dist.files or []:
        if file.parts[0] == ".." or "__pycache__" in file.parts:
            continue  # console scripts and byte code: not needed to import it
        target = site / file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(str(dist.locate_file(file))), target)


@pytest.fixture(scope="module")
def host_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("host-wheel")
    source = work / "hostclient"
    shutil.copytree(ROOT / "hostclient", source, symlinks=False, ignore=shutil.ignore_patterns("build"))
    return build_wheel(source, work / "dist")


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory: pytest.TempPathFactory, host_wheel: Path) -> Path:
    """A fresh venv with esperd-host and its two dependencies, nothing else."""
    env = tmp_path_factory.mktemp("host-venv") / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    for dependency in HOST_DEPENDENCIES:
        for name in requirement_names(dependency):
            copy_distribution(name, site)
    subprocess.run(
        [sys.executable, "-m", "pip", "--isolated", "--python", str(python), "install"]
        + ["--no-index", "-q", str(host_wheel)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return python


def test_the_host_wheel_holds_the_contract_and_the_client_only(host_wheel: Path) -> None:
    with zipfile.ZipFile(host_wheel) as wheel:
        names = wheel.namelist()
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        requires = [
            line.split(":", 1)[1].strip()
            for line in wheel.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {
        "esperd_contracts",
        "esperd_host",
    }
    assert "esperd_contracts/schema/command.json" in names
    unconditional = sorted(r.split(">")[0] for r in requires if "extra ==" not in r)
    assert unconditional == ["msgspec", "nats-py"]


def test_the_main_wheel_installs_no_generic_top_level_names(tmp_path: Path) -> None:
    """contracts/ and examples/ install as esperd_contracts and esperd_examples (pyproject.toml)."""
    source = tmp_path / "esperd"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".*", "build", "*.egg-info", "tests", "benchmarks", "hostclient", "state"
        ),
    )
    with zipfile.ZipFile(build_wheel(source, tmp_path / "dist")) as wheel:
        top = {n.split("/")[0] for n in wheel.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"esperd", "esperd_contracts", "esperd_examples"}


def test_a_host_without_torch_talks_to_the_broker(light_venv: Path, nats_server: NatsServer) -> None:
    subscriber = subprocess.Popen(  # the main environment reads what the light host sent
        [sys.executable, "-c", SUBSCRIBER, nats_server.url, run_subject("light-host", Channel.HEALTH)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert subscriber.stdout is not None
        assert subscriber.stdout.readline().strip() == "ready"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        out = subprocess.run(
            [str(light_venv), "-c", HOST_SCRIPT, nats_server.url],
            check=True,
            capture_output=True,
            text=True,
            cwd=light_venv.parent,  # not the repository: only what was installed can be imported
            env=env,
            timeout=60,
        )
        received = subscriber.communicate(timeout=30)[0]
    finally:
        subscriber.kill()
    report = json.loads(out.stdout)
    assert report["torch_importable"] is False
    assert report["loaded"] == []  # neither torch, numpy nor the daemon's package
    assert Path(report["client_file"]).is_relative_to(light_venv.parents[1])
    assert report["version"] == importlib.metadata.version("esperd")
    batch = Codec().decode(bytes.fromhex(received.strip()))
    assert isinstance(batch, HealthBatch)
    assert [(s.layer_id, s.health_score) for s in batch.signals] == [(3, 0.25)]


SUBSCRIBER = """
import asyncio, sys

import nats


async def main(url: str, subject: str) -> None:
    nc = await nats.connect(url)
    sub = await nc.subscribe(subject)
    await nc.flush()
    print("ready", flush=True)
    msg = await sub.next_msg(timeout=30)
    print(msg.data.hex(), flush=True)
    await nc.close()


asyncio.run(main(sys.argv[1], sys.argv[2]))
"""
