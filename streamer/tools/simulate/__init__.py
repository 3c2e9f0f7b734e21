"""``streamer simulate``: a Deribit option market generated from a known, moving vol surface.

The simulator writes recordings in the DESIGN section 3 format (one received frame a line)
whose frames are what a Deribit websocket would deliver. Because the surface behind every price
is known, a sidecar ``.truth.json`` holds the ground truth (spot, forwards, SSVI parameters and
ATM vols every ~10 s of feed time) that tests and users compare published surfaces against.
Same seed and arguments: byte-identical files (one ``numpy.random.Generator``, a fixed start
time, never the wall clock).

Modules, in the order a run uses them:

* ``market``: the model (Bates spot, SSVI surface with OU parameter paths, its bounds);
* ``listing``: Deribit's expiry calendar, strike grids, the option chain;
* ``quotes``: a ticker's values off the surface (marks, ticked bid/ask, their IVs, Greeks);
* ``frames``: the JSON-RPC frames, and the ``bad-data`` scenario's spoiled ones;
* ``scenarios``: what a run is (``SimConfig``, the scenarios and their timeline);
* ``simulation``: the run itself (``Simulation``, ``simulate``) and its ground truth;
* ``writer``: the recording and the truth sidecar on disk (``write``, ``load_truth``).

This package re-exports what other code uses; the rest is imported from its module.
"""

from streamer.tools.simulate.frames import BAD_KINDS, EXPECTED_DROP
from streamer.tools.simulate.listing import UNDERLYINGS
from streamer.tools.simulate.market import MarketParams
from streamer.tools.simulate.scenarios import (
    DEFAULT_RATE,
    DEFAULT_START,
    EXPIRY_ROLL_START,
    SCENARIOS,
    SimConfig,
)
from streamer.tools.simulate.simulation import TRUTH_SCHEMA, Simulation, simulate
from streamer.tools.simulate.writer import (
    WriteResult,
    load_truth,
    truth_json,
    truth_path_for,
    write,
)

__all__ = [
    "BAD_KINDS",
    "DEFAULT_RATE",
    "DEFAULT_START",
    "EXPECTED_DROP",
    "EXPIRY_ROLL_START",
    "SCENARIOS",
    "TRUTH_SCHEMA",
    "UNDERLYINGS",
    "MarketParams",
    "SimConfig",
    "Simulation",
    "WriteResult",
    "load_truth",
    "simulate",
    "truth_json",
    "truth_path_for",
    "write",
]
