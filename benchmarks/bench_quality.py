"""Fit quality per model on the real Deribit chains (same as ``streamer bench quality``)."""

import sys

from streamer.tools.bench.quality import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
