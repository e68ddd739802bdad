"""Old revisions of the engine, loaded from git into a benchmark's process so that the code as it was is timed
beside the code as it is, on the same noise. Every revision a benchmark loads is named here, with why it is
pinned; nothing else in bench/ names a commit.

The table is REVISIONS below: a name, the commit, what it is and why it is pinned, and who loads it.

A revision's modules are read with `git show COMMIT:PATH` (the history must be there: a full clone) and loaded
under private names (`rev_<commit>_<module>`), so they sit beside today's modules. Their imports are rewritten: an
engine module loaded from the same revision is imported as that private module, and a module that has moved since
(MOVED: old dotted path -> its current home) from where it is now. `old_decoder` and `old_decode_step` give a
revision's decoder on today's weights and its decode step on a cache of its own revision.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import paddle

from service.engine.checkpoints.model_config import ModelConfig
from service.engine.decoder import LayerWeights, ModelWeights

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Revision:
    commit: str
    why: str  # what the code was then, and why that point is the one to compare with
    used_by: str


REVISIONS = {
    "orig": Revision("57d17f4", "the decoder and cache before issue #13's levers: the branch's base 29d6c87 plus "
                     "the trace hook, nothing else (bench/PROFILE.md's 'before')",
                     "bench.profile_step --paths orig, --breakdown-paths orig"),
    "true_lengths_base": Revision("f6568e7", "the decoder just before attention over the true lengths: the commit "
                                  "that lever was built on (PROFILE.md's true-lengths table, 'before')",
                                  "bench.levers.true_lengths (its before@ path)"),
}

# Engine modules that have moved: the dotted path they had at older revisions -> where they are now.
MOVED = {
    "service.engine.model": "service.engine.decoder",
    "service.engine.model_config": "service.engine.checkpoints.model_config",
    "service.engine.loader": "service.engine.checkpoints.loader",
    "service.engine.gguf": "service.engine.checkpoints.gguf",
    "service.engine.fetch": "service.engine.checkpoints.fetch",
    "service.engine.registry": "service.engine.checkpoints.registry",
    "service.engine.default_model": "service.engine.checkpoints.random_checkpoints",
    "service.engine.engine": "service.engine.scheduler",
}


def commit_of(name_or_commit: str) -> str:
    """A REVISIONS name's commit; anything else is taken as a git revision as it is (from a command line)."""
    rev = REVISIONS.get(name_or_commit)
    return rev.commit if rev else name_or_commit


def _old_paths(module: str) -> list[str]:
    """Dotted paths a module of today may have had: its own, then any older one that moved to it."""
    return [module, *(old for old, new in MOVED.items() if new == module)]


def _git_show(commit: str, dotted: str) -> str | None:
    done = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{dotted.replace('.', '/')}.py"],
                          capture_output=True, text=True, check=False)
    return done.stdout if done.returncode == 0 else None


def load_engine_modules(name_or_commit: str, modules: tuple[str, ...] = ("service.engine.kv_cache",
                                                                          "service.engine.decoder")
                        ) -> dict[str, ModuleType]:
    """Today's engine modules `modules` (dotted, today's names) as they were at a revision, loaded once per process;
    returned by today's name. Load a module's in-repo dependencies first (kv_cache before the decoder)."""
    commit = commit_of(name_or_commit)
    out: dict[str, ModuleType] = {}
    loaded_as: dict[str, str] = {}  # a dotted path the old sources import -> the private module loaded for it
    tmp = Path(tempfile.mkdtemp(prefix=f"tokenstream-rev-{commit}-"))
    for module in modules:
        private = f"rev_{commit}_{module.rsplit('.', 1)[-1]}"
        found = next(((p, src) for p in _old_paths(module) if (src := _git_show(commit, p)) is not None), None)
        if found is None:
            raise FileNotFoundError(f"{module} (or an older path of it) is not in revision {commit}")
        old_path, src = found
        for p in {old_path, module}:
            loaded_as[p] = private
        if private not in sys.modules:
            (tmp / f"{private}.py").write_text(_rewrite(src, loaded_as))
            spec = importlib.util.spec_from_file_location(private, tmp / f"{private}.py")
            assert spec is not None
            assert spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            sys.modules[private] = mod
            spec.loader.exec_module(mod)
        out[module] = sys.modules[private]
    return out


def _rewrite(src: str, loaded_as: dict[str, str]) -> str:
    """Point an old source's `from service... import` lines at the modules loaded from its revision, or at the
    current homes of modules that have moved."""

    def repl(m: re.Match[str]) -> str:
        dotted = m.group(1)
        return f"from {loaded_as.get(dotted) or MOVED.get(dotted, dotted)} import"

    return re.sub(r"^from (service(?:\.\w+)+) import", repl, src, flags=re.MULTILINE)


# -- an old revision's decode step beside today's ------------------------------------------------

DecodeStep = Callable[[Any, np.ndarray, np.ndarray], np.ndarray]  # (cache, tokens [B], positions [B]) -> logits


def unsplit(weights: ModelWeights) -> ModelWeights:
    """The weights with gate_up whole again, for decoders that read it (older revisions, split_gate_up=False) once
    a decoder of today has split it (it keeps only the halves)."""
    def whole(layer: LayerWeights) -> LayerWeights:
        if layer.gate_up is not None:
            return layer
        assert layer.gate is not None
        assert layer.up is not None
        return dataclasses.replace(layer, gate_up=paddle.concat([layer.gate, layer.up], axis=1))

    layers = [whole(layer) for layer in weights.layers]
    return dataclasses.replace(weights, layers=layers)


def old_decoder(name_or_commit: str, cfg: ModelConfig, weights: ModelWeights, max_context: int = 2048) -> Any:
    """The LlamaDecoder of a revision on today's weights (float32; its constructor then took no options)."""
    mods = load_engine_modules(name_or_commit)
    return mods["service.engine.decoder"].LlamaDecoder(cfg, unsplit(weights), max_context, "float32")


def old_decode_step(name_or_commit: str, cfg: ModelConfig, dec: Any, max_context: int = 2048) -> DecodeStep:
    """`dec.decode_step` (a decoder of that revision) with a SlotKVCache of the same revision: the step takes a
    cache of today and runs on one of its own with the same slots and capacity (zeros in it: values do not change
    the time). For A/B against the code as it was."""
    old_cache = load_engine_modules(name_or_commit)["service.engine.kv_cache"].SlotKVCache
    own: dict[tuple[int, int], Any] = {}
    # Later revisions allocate slots in buckets and take them as `slots`; earlier ones always hold every slot.
    sized = "slots" in inspect.signature(old_cache.resize).parameters

    def step(cache: Any, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        key = (cache.slots, cache.capacity)
        if key not in own:
            c = old_cache(cfg.num_layers, cache.slots, cfg.num_kv_heads, cfg.head_dim, max_context, "float32")
            if sized:
                c.resize(cache.capacity, cache.slots, slots=cache.slots)
            else:
                c.resize(cache.capacity, 0)
            own[key] = c
        return np.asarray(dec.decode_step(own[key], tokens, positions))

    return step
