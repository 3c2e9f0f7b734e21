"""Implied-vol benchmark (same as ``streamer bench iv``)."""

import sys

from streamer.tools.bench.iv import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
