"""``sandboxctl exec``: run a program in a fresh sandbox, live, with its exit code.

The program's stdout and stderr stream to ours as it writes them (a compiler's output
goes to stderr); we exit with the program's exit code, or, when it did not simply exit,
with the code its status maps to (see ``--help``).
"""

from __future__ import annotations

import base64
import json
import os
import sys
from typing import IO

import click

from sandboxctl.app import EXIT_SERVICE, EXIT_TIMEOUT, App
from sandboxd.protocol import Status
from sandboxd.result import ExecutionResult

# What `sandboxctl exec` exits with when the program did not exit on its own.
STATUS_EXIT_CODES = {
    Status.COMPILE_ERROR: 1,
    Status.TIMEOUT: EXIT_TIMEOUT,
    Status.MEMORY_LIMIT: 137,  # like a process the OOM killer took (128 + SIGKILL)
    Status.OUTPUT_LIMIT: 141,  # like a writer whose reader went away (128 + SIGPIPE)
    Status.KILLED: 137,
    Status.INTERNAL_ERROR: EXIT_SERVICE,
}


def exit_code_of(result: ExecutionResult) -> int:
    if result.status in (Status.OK, Status.RUNTIME_ERROR):
        if result.signal:
            return 128 + result.signal
        return result.exit_code or 0
    return STATUS_EXIT_CODES[result.status]


def stream_to_terminal(stage: str, stream: str, data: str) -> None:
    target: IO[str] = sys.stdout if stream == "stdout" and stage == "run" else sys.stderr
    target.write(data)
    target.flush()


def parse_limits(pairs: tuple[str, ...]) -> dict[str, float] | None:
    limits: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            if not sep:
                raise ValueError(pair)
            limits[name.strip()] = float(value) if "." in value else int(value)
        except ValueError:
            raise click.BadParameter(
                f"{pair!r}: expected NAME=NUMBER", param_hint="--limit"
            ) from None
    return limits or None


# --limit NAME=VALUE, repeatable, as every command that runs code takes it (parse_limits).
limit_option = click.option(
    "--limit",
    "limits",
    multiple=True,
    metavar="NAME=VALUE",
    help="Any limit, e.g. memory_bytes=268435456 (repeatable; see docs/api.md).",
)


def read_files(specs: tuple[str, ...]) -> list[dict[str, str]] | None:
    files = []
    for spec in specs:
        local, _, dest = spec.partition(":")
        try:
            with open(local, "rb") as file:
                content = file.read()
        except OSError as exc:
            raise click.BadParameter(f"{local}: {exc.strerror}", param_hint="--file") from None
        files.append(
            {
                "path": dest or os.path.basename(local),
                "content": base64.b64encode(content).decode(),
                "encoding": "base64",
            }
        )
    return files or None


@click.command("exec")
@click.option("-l", "--language", required=True, help="python, typescript, rust (or an alias).")
@click.option("-c", "--code", help="The program's source code.")
@click.argument("source", type=click.File("r"), required=False)
@click.option("--stdin", "stdin_text", help="Text the program reads on its stdin.")
@click.option(
    "--stdin-file", type=click.File("r"), help="A file (or -) the program reads on stdin."
)
@click.option(
    "-a", "--arg", "args", multiple=True, help="An argument for the program (repeatable)."
)
@click.option(
    "-f",
    "--file",
    "files",
    multiple=True,
    metavar="LOCAL[:PATH]",
    help="Put a local file into the working directory (repeatable).",
)
@click.option("-t", "--timeout", type=float, help="Wall-time limit in seconds.")
@limit_option
@click.option("--network", is_flag=True, help="Egress to what the server allows ([network] allow).")
@click.option("--json", "as_json", is_flag=True, help="Print the full result record as JSON.")
@click.pass_obj
def exec_command(
    app: App,
    language: str,
    code: str | None,
    source: IO[str] | None,
    stdin_text: str | None,
    stdin_file: IO[str] | None,
    args: tuple[str, ...],
    files: tuple[str, ...],
    timeout: float | None,
    limits: tuple[str, ...],
    network: bool,
    as_json: bool,
) -> None:
    """Run a program (from -c CODE, a SOURCE file, or - for stdin) in a fresh sandbox.

    Exits with the program's exit code (128+N if signal N killed it); otherwise
    1 for a compile error, 124 on timeout, 137 over the memory limit or when the
    sandbox was killed, 141 over the output limit, 125 when the service failed,
    2 when the request was refused.
    """
    program = program_of(code, source)
    if stdin_text is not None and stdin_file is not None:
        raise click.UsageError("give --stdin or --stdin-file, not both")
    stdin = stdin_text if stdin_file is None else stdin_file.read()
    result = app.client.execute(
        language,
        program,
        stdin=stdin,
        args=list(args) or None,
        files=read_files(files),
        timeout=timeout,
        limits=parse_limits(limits),
        network=network or None,
        on_output=None if as_json else stream_to_terminal,
    )
    finish(result, as_json)


def program_of(code: str | None, source: IO[str] | None) -> str:
    """The program given with -c CODE, or as a SOURCE file; UsageError for both or none."""
    if source is None:
        if code is None:
            raise click.UsageError(
                "give the program either with -c CODE or as SOURCE (- for stdin)"
            )
        return code
    if code is not None:
        raise click.UsageError("give the program either with -c CODE or as SOURCE, not both")
    return source.read()


def finish(result: ExecutionResult, as_json: bool) -> None:
    """Print the record (as JSON), or say why the program did not simply exit; then exit
    as the program did."""
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif result.status not in (Status.OK, Status.RUNTIME_ERROR) or (
        result.signal and not result.ok
    ):
        click.echo(f"sandboxctl: {result.status}: {result.message}", err=True)
    sys.exit(exit_code_of(result))
