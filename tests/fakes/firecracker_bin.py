"""Executables for the fake Firecracker and jailer, as a daemon under test launches them.

``install_fakes(directory)`` writes ``firecracker`` and ``jailer`` there: Python scripts with
this interpreter in their shebang and the repository's root written in, so they work wherever
they are copied (the jailer copies ``firecracker`` into each jail) and with an empty
environment (the jailer clears it).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

_LAUNCHER = """#!{python}
# A fake {name} for sandboxd's tests (tests/fakes/{module}.py).
import sys

sys.path.insert(0, {root!r})
from tests.fakes.{module} import main

sys.exit(main({options}))
"""


def install_fakes(directory: Path, console_noise: int = 0) -> tuple[Path, Path]:
    """Write the ``firecracker`` and ``jailer`` launchers into ``directory``; their paths.
    With ``console_noise``, the fake Firecracker writes so many bytes of console lines to
    its stdout as each VM starts (a guest that logs its boot there)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, module in (("firecracker", "firecracker_api"), ("jailer", "jailer")):
        path = directory / name
        options = f"console_noise={console_noise}" if name == "firecracker" else ""
        launcher = _LAUNCHER.format(
            python=sys.executable, name=name, module=module, root=str(REPO_ROOT), options=options
        )
        path.write_text(launcher)
        path.chmod(0o755)
        paths.append(path)
    return paths[0], paths[1]
