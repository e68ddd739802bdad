"""The contract gate: `buf breaking` against the tag of the last published contract, which can fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUF = Path(sys.executable).parent / "buf"
PROTO = "proto/tokenstream/v1/generation.proto"
BUF_FOUND_PROBLEMS = 100  # buf's exit status when it reports file annotations (here: breaking changes)

pytestmark = pytest.mark.skipif(not BUF.exists(), reason="buf comes with the dev extra (buf-bin)")


def contract_tag() -> str:
    done = subprocess.run([str(ROOT / ".ci" / "contract-tag")], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def breaking(repo: Path, tag: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BUF), "breaking", "--against", f".git#tag={tag}"], cwd=repo, capture_output=True,
                          text=True, check=False)


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_the_current_contract_is_compatible_with_the_published_one() -> None:
    done = breaking(ROOT, contract_tag())
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_breaking_change_fails_the_gate(tmp_path: Path) -> None:
    """The published proto in a scratch repository, tagged as CI tags it, then a field renumbered and one removed."""
    tag = contract_tag()
    published = subprocess.run(["git", "show", f"{tag}:{PROTO}"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout
    (tmp_path / PROTO).parent.mkdir(parents=True)
    (tmp_path / PROTO).write_text(published)
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "published")
    git(tmp_path, "tag", tag)
    assert breaking(tmp_path, tag).returncode == 0
    changed = published.replace("uint32 top_k = 2;", "uint32 top_k = 20;").replace(
        "  optional uint64 seed = 4;\n", "")
    assert changed != published
    (tmp_path / PROTO).write_text(changed)
    done = breaking(tmp_path, tag)
    assert done.returncode == BUF_FOUND_PROBLEMS, done.stdout + done.stderr  # not a crash: a finding
    assert "top_k" in done.stdout and "seed" in done.stdout, done.stdout
