"""`python -m service.models`: list the registered models, or fetch them into the model cache ahead of serving.

    python -m service.models list
    python -m service.models fetch [NAME ...] [--model-cache DIR]     (default: the default model)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.engine.api import default_model_cache
from service.engine.checkpoints.registry import (
    ALIASES,
    MODELS,
    UnknownModelError,
    canonical_name,
    locate,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.models", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["list", "fetch"])
    parser.add_argument("names", nargs="*", default=["default"])
    parser.add_argument("--model-cache", default="", help="cache root (default $XDG_CACHE_HOME/tokenstream/models)")
    args = parser.parse_args(argv)
    cache = Path(args.model_cache) if args.model_cache else default_model_cache()
    if args.command == "list":
        aliases = {target: alias for alias, target in ALIASES.items()}
        for name, model in MODELS.items():
            alias = f" (= {aliases[name]})" if name in aliases else ""
            print(f"{name}{alias}: {model.description}")
        return 0
    for name in args.names:
        if canonical_name(name) is None:
            print(f"{name!r} is not a registered model; known: {', '.join([*ALIASES, *MODELS])}", file=sys.stderr)
            return 2
        try:
            served, path = locate(name, cache)
        except UnknownModelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{served}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
