"""The server's settings: each declared once with its bounds, and a value out of range stops the server at start
with the setting's name, whether it came from a flag or from the environment."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields

import pytest

from service.config import Config, _settings, load_config
from service.engine.api import AUTO_DECODE_THREADS, EngineConfig

BOUNDED = [(f.name, f.metadata) for _, f in _settings() if {"at_least", "above", "at_most"} & f.metadata.keys()]


def _outside(meta: dict) -> object:
    """A value just outside the declared bounds."""
    if "at_least" in meta:
        return meta["at_least"] - 1
    if "above" in meta:
        return meta["above"]
    return meta["at_most"] + 1


def test_numeric_settings_declare_bounds() -> None:
    numeric = [f.name for _, f in _settings() if type(f.default) in (int, float)]
    assert {name for name, _ in BOUNDED} == set(numeric), "a numeric setting without bounds"


@pytest.mark.parametrize(("name", "meta"), BOUNDED, ids=[name for name, _ in BOUNDED])
def test_a_value_out_of_bounds_is_refused_naming_the_setting(name: str, meta: dict) -> None:
    bad = str(_outside(meta))
    flag = "--" + name.replace("_", "-")
    with pytest.raises(SystemExit, match=rf"{name}: must be"):
        load_config([f"{flag}={bad}"], env={})
    with pytest.raises(SystemExit, match=rf"{name}: must be"):
        load_config([], env={f"TOKENSTREAM_{name.upper()}": bad})


@pytest.mark.parametrize(("name", "meta"), BOUNDED, ids=[name for name, _ in BOUNDED])
def test_the_bound_itself_is_accepted(name: str, meta: dict) -> None:
    edge = meta.get("at_least", meta.get("at_most"))
    if edge is None:  # only an open bound ("above"): any value past it
        edge = meta["above"] + 0.5
    config = load_config([f"--{name.replace('_', '-')}={edge}"], env={})
    holder = config.engine if name in {f.name for f in fields(EngineConfig)} else config
    assert getattr(holder, name) == edge


def test_decode_threads_zero_is_the_cpus_this_process_may_use_at_most_the_measured_count() -> None:
    assert Config().engine.decode_threads == 0
    assert EngineConfig().threads == min(len(os.sched_getaffinity(0)), AUTO_DECODE_THREADS)
    assert EngineConfig(decode_threads=3).threads == 3


def test_the_server_stops_at_start_with_the_setting_named() -> None:
    proc = subprocess.run([sys.executable, "-m", "service", "--max-slots", "0", "--port", "0"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    assert "max_slots: must be at least 1, not 0" in proc.stderr
