"""``python -m bench``: run the figures, print the table, write ``bench/last-results.md``."""

from __future__ import annotations

import sys

from bench import main

if __name__ == "__main__":
    sys.exit(main.main())
