"""Run the reference host: ``python -m fabstir_jupyter.host --port 0``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
