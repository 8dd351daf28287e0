"""Debian's trans-de-en dictionary: found on the system, or fetched with apt-get download + dpkg -x into
~/.cache/lmforge (nothing installed system-wide)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ...errors import LMForgeError

TRANS_DE_EN = Path("/usr/share/trans/de-en")  # where Debian installs it


def cache_dir() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))


def trans_de_en_path(fetch: bool = True) -> Path:
    """The ``de-en`` dictionary file: the system's, else a cached copy fetched with ``apt-get download``
    and unpacked with ``dpkg -x`` (nothing is installed system-wide)."""
    env = os.environ.get("LMFORGE_TRANS_DE_EN")
    if env:
        if not Path(env).is_file():
            raise LMForgeError(f"LMFORGE_TRANS_DE_EN={env} is not a file")
        return Path(env)
    if TRANS_DE_EN.is_file():
        return TRANS_DE_EN
    cached = cache_dir() / "trans-de-en" / "usr" / "share" / "trans" / "de-en"
    if cached.is_file():
        return cached
    if not fetch:
        raise LMForgeError(f"{TRANS_DE_EN} is absent and not cached; run make setup")
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        raise LMForgeError(f"the de-en corpus needs Debian's trans-de-en package: {TRANS_DE_EN} is absent and "
                           "apt-get/dpkg are not available to fetch it; copy the file there or set "
                           "LMFORGE_TRANS_DE_EN=/path/to/de-en")
    root = cache_dir() / "trans-de-en"
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        print("lmforge: fetching Debian package trans-de-en (apt-get download) ...", file=sys.stderr)
        r = subprocess.run(["apt-get", "download", "trans-de-en"], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("trans-de-en*.deb"))
        if r.returncode != 0 or not debs:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise LMForgeError(f"apt-get download trans-de-en failed ({last}); install trans-de-en or set "
                               "LMFORGE_TRANS_DE_EN=/path/to/de-en")
        unpack = Path(tmp) / "x"
        r = subprocess.run(["dpkg", "-x", str(debs[0]), str(unpack)], capture_output=True, text=True)
        if r.returncode != 0 or not (unpack / "usr/share/trans/de-en").is_file():
            raise LMForgeError(f"dpkg -x {debs[0].name} failed: {r.stderr.strip()[:200]}")
        if root.exists():
            shutil.rmtree(root)
        unpack.rename(root)
    return cached
