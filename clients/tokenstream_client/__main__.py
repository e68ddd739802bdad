"""python -m tokenstream_client: the tokenstream CLI."""

import sys

from tokenstream_client.cli import main

sys.exit(main())
