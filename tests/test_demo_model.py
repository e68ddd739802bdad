"""The default model: the trained demo checkpoint in models/, loaded through the same code as any model."""

from __future__ import annotations

import unicodedata

import pytest

from service.config import Config
from service.engine.engine import Engine, EngineConfig
from service.engine.loader import load_model
from service.engine.types import GenerationRequest
from service.server import DEMO_MODEL, resolve_model_dir

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "config.json").exists(), reason="models/tokenstream-demo is absent")


def _cjk_share(text: str) -> float:
    letters = [c for c in text if not c.isspace() and unicodedata.category(c)[0] in "LN"]
    return sum("\u4e00" <= c <= "\u9fff" for c in letters) / max(1, len(letters))


def test_default_resolves_to_the_trained_demo_model_and_it_speaks() -> None:
    assert resolve_model_dir(Config()) == str(DEMO_MODEL)
    model = load_model(DEMO_MODEL)
    assert model.config.vocab_size <= 8192 and model.tokenizer.chat_template
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
