"""Live receive loop benchmark: the real DeribitFeed against the fake server (same as
``streamer bench live``)."""

import sys

from streamer.tools.bench.live import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
