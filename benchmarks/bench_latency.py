"""Tick-to-publish latency through the service and mosquitto (``streamer bench latency``)."""

import sys

from streamer.tools.bench.latency import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
