"""streamer: keeps crypto option volatility surfaces calibrated in real time.

Feeds -> parse -> book -> calibrate -> publish (MQTT / JSONL). See README.md.
"""

import hashlib
import os
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("streamer")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__"]

_KERNEL_PACKAGES = ("pricing", "models", "calib")


def _key_numba_cache() -> None:
    """Key numba's on-disk cache by a hash of the package's kernel sources.

    numba (``cache=True``) invalidates a cached function only when *its own* file changes;
    a kernel that inlines or calls one from another module (the calibrator's compiled LM
    inlines each model's row kernel) would keep stale machine code after an edit or a partial
    upgrade. Every version of the sources gets its own directory under the first writable of
    ``$NUMBA_CACHE_DIR``, ``$XDG_CACHE_HOME/streamer/numba`` (``~/.cache``) and the temp dir;
    a sandboxed service (read-only home and install) thus still has a cache, where numba
    itself would refuse to import a cached kernel.
    """
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for sub in _KERNEL_PACKAGES:
        for path in sorted((here / sub).glob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    key = digest.hexdigest()[:16]
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    bases = [os.environ.get("NUMBA_CACHE_DIR"), xdg / "streamer" / "numba"]
    bases.append(Path(tempfile.gettempdir()) / f"streamer-numba-{os.getuid()}")
    for base in (Path(b) for b in bases if b):
        target = base if base.name == key else base / key  # a child inherits the keyed dir
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(target, os.W_OK):
            if "numba" in sys.modules:
                sys.modules["numba"].config.CACHE_DIR = str(target)
            os.environ["NUMBA_CACHE_DIR"] = str(target)
            return


_key_numba_cache()
