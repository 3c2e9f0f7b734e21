"""Where numba keeps the compiled kernels: a disk cache keyed by the kernel sources.

numba (``cache=True``) invalidates a cached function only when *its own* file changes; a kernel
that inlines or calls one from another module (the calibrator's compiled LM inlines each model's
row kernel) would keep stale machine code after an edit or a partial upgrade. So every version
of the kernel sources (``streamer/pricing``, ``models``, ``calib``) gets its own directory,
under the first usable base of

1. ``$NUMBA_CACHE_DIR`` (the systemd units set ``%C/streamer/numba``),
2. ``$XDG_CACHE_HOME/streamer/numba`` (``~/.cache``),
3. ``$TMPDIR/streamer-numba-$UID``, used only when it is a directory owned by this user with
   mode 0700 (created so; a shared temp dir must not let another user plant machine code).

A sandboxed service (read-only home and install) thus still has a cache, where numba itself
would refuse to import a cached kernel. ``configure`` runs once, when ``streamer.pricing`` is
first imported: before any kernel is decorated (numba fixes a function's cache directory then).
It sets ``numba.config.CACHE_DIR`` and leaves the environment alone; a child process keys the
same sources to the same directory by itself.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

KERNEL_PACKAGES = ("pricing", "models", "calib")
KEY_CHARS = 16
_configured: list[Path | None] = []


def source_key(root: Path | None = None) -> str:
    """A short hash of every kernel package's sources (file names and bytes)."""
    here = root or Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for sub in KERNEL_PACKAGES:
        for path in sorted((here / sub).glob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:KEY_CHARS]


def _private_dir(path: Path) -> bool:
    """Create ``path`` with mode 0700 if missing; True when it is ours and private."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
    except OSError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == os.getuid()
        and stat.S_IMODE(st.st_mode) & 0o077 == 0
    )


def cache_dir(key: str | None = None) -> Path | None:
    """The keyed cache directory to use (created), or None when no base is usable."""
    key = key or source_key()
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    env = os.environ.get("NUMBA_CACHE_DIR")
    for base in ([Path(env)] if env else []) + [xdg / "streamer" / "numba"]:
        target = base if base.name == key else base / key
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(target, os.W_OK):
            return target
    fallback = Path(tempfile.gettempdir()) / f"streamer-numba-{os.getuid()}"
    if _private_dir(fallback) and _private_dir(fallback / key):
        return fallback / key
    return None


def configure() -> Path | None:
    """Point numba's cache at ``cache_dir()`` (once per process); returns the directory."""
    if not _configured:
        import numba

        target = cache_dir()
        if target is not None:
            numba.config.CACHE_DIR = str(target)  # type: ignore[attr-defined]
        _configured.append(target)
    return _configured[0]
