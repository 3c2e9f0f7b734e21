"""What ``streamer train`` trains by default (no imports: the CLI builds its parser from
these without loading the pricer)."""

from __future__ import annotations

MODELS = ("heston", "bates", "heston-td", "bates-td")
DEFAULT_SAMPLES = 12_000
DEFAULT_SEED = 16  # the seed of the networks shipped in streamer/calib/nets
# fine-tuned on the optima of recorded real chains (``streamer.tools.train.real``) where the
# shared data exists: the constant-parameter models, each real chain this many times beside
# the simulated ones
REAL_MODELS = ("heston", "bates")
REAL_REPEAT = 10
