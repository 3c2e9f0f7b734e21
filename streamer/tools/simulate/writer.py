"""A simulated run on disk: the recording and its ground-truth sidecar.

The recording is in the DESIGN section 3 format (one received frame a line, written through
``streamer.feeds.recordings.recorder.Recorder``, compression by suffix); ``x.truth.json`` next to
``x.jsonl[.zst|.gz]`` holds ``Simulation.truth`` (schema ``TRUTH_SCHEMA``): the ground truth
(spot, forwards, SSVI parameters and ATM vols every ~10 s of feed time) that tests and users
compare published surfaces against. The recorder's clock is the feed time, so the same run
writes the same bytes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from streamer.errors import InputError
from streamer.tools.simulate.simulation import TRUTH_SCHEMA, Simulation

if TYPE_CHECKING:
    from streamer.feeds.recordings.recorder import Compression

_SUFFIX_COMPRESSION: tuple[tuple[str, Compression], ...] = (
    (".jsonl.zst", "zst"),
    (".jsonl.gz", "gz"),
    (".jsonl", "none"),
)


def truth_path_for(path: str | os.PathLike[str]) -> Path:
    """``x.jsonl[.zst|.gz]`` -> ``x.truth.json``."""
    p = Path(path)
    for suffix, _ in _SUFFIX_COMPRESSION:
        if p.name.endswith(suffix):
            return p.with_name(p.name.removesuffix(suffix) + ".truth.json")
    raise InputError("out", f"must end in .jsonl, .jsonl.gz or .jsonl.zst: {p.name!r}")


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What ``write`` produced."""

    path: Path
    truth_path: Path
    frames: int
    bytes: int  # the file's size on disk
    seconds: float


def write(sim: Simulation, out: str | os.PathLike[str], *, zstd_level: int = 19) -> WriteResult:
    """Run ``sim`` into the recording ``out`` (compression by suffix, via ``Recorder``) and its
    ``.truth.json`` sidecar. The recorder's clock is the feed time, so files are reproducible
    (gzip: the header's MTIME is zeroed, RFC 1952 section 2.3.1)."""
    path = Path(out)
    truth_path = truth_path_for(path)
    compression = next(c for s, c in _SUFFIX_COMPRESSION if path.name.endswith(s))
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=".simulate-", dir=path.parent))
    try:
        written, frames = _record(sim, tmp, compression, zstd_level)
        if compression == "gz":
            with written.open("r+b") as fh:
                fh.seek(4)
                fh.write(b"\0\0\0\0")
        os.replace(written, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    truth_path.write_bytes(truth_json(sim.truth))
    return WriteResult(path, truth_path, frames, path.stat().st_size, time.perf_counter() - t0)


def _record(
    sim: Simulation, folder: Path, compression: Compression, zstd_level: int
) -> tuple[Path, int]:
    """Every frame of ``sim`` into one recorder file in ``folder``: (the file, frames)."""
    from streamer.feeds.recordings.recorder import Recorder

    clock = [sim.config.start_ms * 1_000_000]
    frames = 0
    rec = Recorder(
        folder,
        venue="deribit",
        rotate_bytes=1 << 62,
        rotate_seconds=1e12,
        compression=compression,
        flush_interval_s=1e9,
        clock=lambda: clock[0],
        zstd_level=zstd_level,
    )
    with rec:
        for ts_ns, frame in sim:
            clock[0] = ts_ns
            rec.write(frame, ts_ns)
            frames += 1
    return rec.paths[0], frames


def truth_json(truth: dict[str, Any]) -> bytes:
    """The truth as JSON, one path sample a line (diff-able, still one JSON document)."""
    head = {k: v for k, v in truth.items() if k != "path"}
    body = orjson.dumps(head)[:-1]
    lines = b",\n".join(orjson.dumps(s) for s in truth.get("path", []))
    return body + b',\n"path":[\n' + lines + b"\n]}\n"


def load_truth(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``.truth.json`` file."""
    data: dict[str, Any] = orjson.loads(Path(path).read_bytes())
    if data.get("schema") != TRUTH_SCHEMA:
        raise InputError("truth", f"{path}: not a {TRUTH_SCHEMA} file")
    return data
