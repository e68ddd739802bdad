"""`python -m service`: serve the configured model until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    # Paddle warns at import about ccache and deprecated APIs: noise for a server's log.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from service.config import load_config
    from service.logs import configure_logging
    from service.server import serve
    from service.telemetry import tracer_provider_from_env

    config = load_config(argv)
    configure_logging()
    provider = tracer_provider_from_env(os.environ)
    try:
        asyncio.run(serve(config, tracer_provider=provider))
    except Exception as exc:  # noqa: BLE001 -- a model that cannot load: say why in one line, exit non-zero
        logging.getLogger("tokenstream").error("fatal: %s", exc)
        return 1
    finally:
        if provider is not None:
            provider.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
