"""The README's curl examples, run against a gateway and checked (``make test-api``).

Each example is a ``bash`` block holding one ``curl`` command followed by a ``json``
block with the answer it shows. The command runs as written, its URL pointed at the
gateway under test; the answer must be HTTP 200 with JSON that has every field the
README shows, and the same values where they do not depend on the machine (SAME).

    python -m tests.readme_api [URL]    # default http://localhost:8000
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parents[1] / "README.md"
SHOWN_URL = "http://localhost:8000"
SAME = {"status", "exit_code", "stdout", "stderr", "languages"}
EXAMPLE = re.compile(r"```bash\n(curl [^`]*?)```\s*```json\n(.*?)```", re.DOTALL)


def examples(readme: str) -> list[tuple[str, Any]]:
    """(command, the answer shown) of each curl example."""
    return [(command.strip(), json.loads(shown)) for command, shown in EXAMPLE.findall(readme)]


def differences(shown: Any, answer: Any, where: str = "") -> list[str]:
    """What of ``shown`` the ``answer`` lacks or has otherwise (SAME fields only)."""
    if isinstance(shown, dict):
        if not isinstance(answer, dict):
            return [f"{where or 'the answer'}: expected an object, got {answer!r}"]
        found = []
        for key, value in shown.items():
            if key not in answer:
                found.append(f"{where}{key}: missing")
            elif isinstance(value, dict):
                found += differences(value, answer[key], f"{where}{key}.")
            elif key in SAME and answer[key] != value:
                found.append(f"{where}{key}: {answer[key]!r}, the README shows {value!r}")
        return found
    return []


def check(url: str, readme: str | None = None) -> list[str]:
    """Every failure of the README's examples against the gateway at ``url``."""
    text = README.read_text() if readme is None else readme
    found = examples(text)
    if not found:
        return ["the README has no curl example followed by its answer"]
    failures = []
    for command, shown in found:
        argv = shlex.split(command.replace("\\\n", " ").replace(SHOWN_URL, url.rstrip("/")))
        done = subprocess.run(
            [*argv, "--silent", "--show-error", "--write-out", "\n%{http_code}"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        body, _, status = done.stdout.rpartition("\n")
        first = command.splitlines()[0]
        if done.returncode != 0 or status != "200":
            failures.append(f"{first}: curl {done.returncode}, HTTP {status}: {done.stderr}{body}")
            continue
        try:
            answer = json.loads(body)
        except ValueError:
            failures.append(f"{first}: not JSON: {body[:200]!r}")
            continue
        failures += [f"{first}: {difference}" for difference in differences(shown, answer)]
    return failures


def main() -> int:
    url = sys.argv[1] if len(sys.argv) > 1 else SHOWN_URL
    failures = check(url)
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    count = len(examples(README.read_text()))
    print(
        f"{count} README examples against {url}: "
        + (f"{len(failures)} failures" if failures else "all pass")
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
