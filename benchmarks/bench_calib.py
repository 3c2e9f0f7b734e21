"""Calibration time per model on a real chain (same as ``streamer bench calib``)."""

import sys

from streamer.tools.bench.calib import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
