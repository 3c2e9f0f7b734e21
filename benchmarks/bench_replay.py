"""Replay throughput benchmark: parse + book frames/s (same as ``streamer bench replay``)."""

import sys

from streamer.tools.bench.replay import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
