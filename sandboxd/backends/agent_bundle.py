"""The guest agent as the one file every backend puts into its sandboxes: a zip of the
``guest.agent`` package that ``python3 -I -S`` runs as it is (its ``__main__`` at the
root), built from the running daemon's own copy of the package."""

from __future__ import annotations

import io
import zipfile
from importlib import resources

PACKAGE = "agent"  # the package's name inside the bundle
MAIN = f"from {PACKAGE}.__main__ import main\n\nraise SystemExit(main())\n"
EPOCH = (1980, 1, 1, 0, 0, 0)  # one date for every entry: the same package, the same bytes


def agent_command(python: str, bundle: str) -> list[str]:
    """The command that runs the agent from ``bundle`` (its options follow): the zip on
    sys.path, not run as a zipapp, whose runpy would cost every start some 10 ms of CPU
    importing what the agent does not use. (A VM, whose agent starts once for its
    snapshot, runs the zipapp: guest/init.sh.)"""
    boot = (
        f"import sys; sys.path.insert(0, {bundle!r}); "
        f"from {PACKAGE}.__main__ import main; sys.exit(main())"
    )
    return [python, "-I", "-S", "-c", boot]


def agent_bundle() -> bytes:
    """The zip of the agent's sources."""
    package = resources.files("guest").joinpath(PACKAGE)
    sources = sorted(
        (entry.name, entry.read_bytes())
        for entry in package.iterdir()
        if entry.name.endswith(".py")
    )
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as bundle:
        bundle.writestr(zipfile.ZipInfo("__main__.py", EPOCH), MAIN)
        for name, source in sources:
            bundle.writestr(zipfile.ZipInfo(f"{PACKAGE}/{name}", EPOCH), source)
    return out.getvalue()
