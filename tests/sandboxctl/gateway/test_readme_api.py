"""``make test-api``: the README's curl examples, run with curl against a real gateway,
answer what the README shows."""

from __future__ import annotations

import subprocess

from tests.readme_api import README, check, examples


def test_the_readme_s_curl_examples_answer_what_it_shows(gateway):
    assert len(examples(README.read_text())) == 3  # health, languages, execute
    assert check(gateway.url) == []
    done = subprocess.run(
        ["make", "-s", "--no-print-directory", "test-api", f"API_URL={gateway.url}"],
        cwd=README.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"3 README examples against {gateway.url}: all pass\n"


def test_an_example_whose_answer_differs_is_reported(gateway):
    readme = README.read_text().replace('"stdout": "Hello from sandboxd!\\n"', '"stdout": "Hi\\n"')
    assert check(gateway.url, readme) == [
        "curl -X POST http://localhost:8000/execute \\: stdout: 'Hello from sandboxd!\\n', "
        "the README shows 'Hi\\n'"
    ]
