"""MQTT publish latency benchmark (same as ``streamer bench mqtt``)."""

import sys

from streamer.tools.bench.mqtt import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
