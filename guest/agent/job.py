"""One job: its stages run in turn, each outcome classified, one result record."""

from __future__ import annotations

import _signal as signal

from .common import BASE_ENV, JobError
from .limits import cpu_rlimit

TYPE_CHECKING = False  # typing costs every sandbox its import
if TYPE_CHECKING:
    from typing import Any

    from .capture import StageOutcome
    from .runner import Runner


def job_result(job: dict[str, Any], runner: Runner) -> dict[str, Any]:
    """The ``result`` message of one job, an internal error if it could not be run."""
    try:
        return {"type": "result", **run_job(job, runner)}
    except (JobError, ValueError) as exc:
        return failed_result(exc)


def failed_result(exc: Exception) -> dict[str, Any]:
    """The ``result`` message of a job that could not be run (a file that cannot be
    written): the daemon's own run of a job without the agent answers it alike."""
    return {"type": "result", "status": "internal_error", "message": f"agent: {exc}"}


def run_job(job: dict[str, Any], runner: Runner) -> dict[str, Any]:
    """Carry out one job and return its result record (without the "type" key)."""
    try:
        limits = job["limits"]
        files = job["files"]
        run_argv = [str(arg) for arg in job["run"]["argv"]]
        compile_step = job.get("compile") or {}
        compile_argv = [str(arg) for arg in compile_step.get("argv", [])]
        # The compiler writes its own files (the binary, temporaries): the program's
        # file-size limit is not meant for them.
        compile_limits = {
            **limits,
            "file_size_bytes": compile_step.get("file_size_bytes", limits["file_size_bytes"]),
        }
        env = {**BASE_ENV, **{str(k): str(v) for k, v in job.get("env", {}).items()}}
        stdin = str(job.get("stdin") or "").encode()
        stream_stdin = bool(job.get("stdin_stream"))
        network = bool(job.get("network"))
        cell = job["run"].get("cell")  # a session's Python cell: its code
        if cell is not None:
            cell = str(cell)
    except (KeyError, TypeError, AttributeError) as exc:
        raise JobError(f"malformed job message: {exc!r}") from exc
    runner.cancelled, runner.held_stdin = False, []
    runner.confinement.give_network(network)
    warm = None if cell is not None else runner.take_warm(run_argv, env, files, bool(compile_argv))
    if warm is None:
        runner.files.write_all(files)
    result = new_result(warm is not None)
    if compile_argv:
        compiled = runner.run(
            "compile",
            compile_argv,
            env=env,
            stdin=b"",
            wall_time=float(limits["compile_time"]),
            cpu_time=float(limits["compile_time"]),
            limits=compile_limits,
        )
        result["compile"] = compiled.record()
        result["timings"]["compile"] = round(compiled.wall, 6)
        status, message = classify(compiled, "compile", limits)
        if status != "ok":
            result["usage"] = {
                "cpu_time": round(compiled.cpu, 6),
                "memory_bytes": compiled.memory_bytes,
            }
            return {"status": status, "message": message, **result}
    run_stage = {
        "env": env,
        "wall_time": float(limits["wall_time"]),
        "cpu_time": float(limits["cpu_time"]),
        "limits": limits,
    }
    if cell is not None:
        from .cells import run_cell

        ran, result["cell"] = run_cell(runner, run_argv[0], cell, stdin.decode(), **run_stage)
    else:
        ran = runner.run(
            "run", run_argv, stdin=stdin, stream_stdin=stream_stdin, warm=warm, **run_stage
        )
    status, message = classify(ran, "run", limits)
    if cell is not None and result["cell"].get("error") and status == "runtime_error":
        message = f"the cell raised {result['cell'].pop('error')}"
    return run_result(ran, status, message, result=result)


def new_result(warm: bool) -> dict[str, Any]:
    """A job's result record before its stages ran."""
    return {
        "exit_code": None,
        "signal": None,
        "truncated": {"stdout": False, "stderr": False},
        "compile": None,
        "timings": {"compile": 0.0, "run": 0.0},
        "usage": {"cpu_time": 0.0, "memory_bytes": 0},
        "warm": warm,
    }


def run_result(
    ran: StageOutcome,
    status: str,
    message: str,
    warm: bool = False,
    result: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The record of a job whose run ended as ``ran``, classified ``status`` with
    ``message`` (after what ``result`` holds of its compile). The daemon makes the
    record of a job it ran without the agent with this too (sandboxd.backends.direct_run)."""
    result = new_result(warm) if result is None else result
    record = ran.record()
    result.update(
        exit_code=record["exit_code"],
        signal=record["signal"],
        truncated=record["truncated"],
        usage={"cpu_time": round(ran.cpu, 6), "memory_bytes": ran.memory_bytes},
    )
    result["timings"]["run"] = record["time"]
    return {"status": status, "message": message, **result}


def _signal_name(number: int) -> str:
    try:
        import signal as names  # only to name one, once

        return names.Signals(number).name
    except ValueError:
        return f"signal {number}"


def classify(outcome: StageOutcome, stage: str, limits: dict[str, Any]) -> tuple[str, str]:
    """The status and a one-line reason for one stage's outcome."""
    if outcome.output_limited:
        return "output_limit", (
            f"{outcome.output_limited} went over the output limit of {limits['output_bytes']} bytes"
        )
    if outcome.oom_killed and outcome.signal == signal.SIGKILL:
        return (
            "memory_limit",
            f"memory limit of {int(limits['memory_bytes']) // 2**20} MiB exceeded",
        )
    cpu_limit = limits["compile_time"] if stage == "compile" else limits["cpu_time"]
    if outcome.cpu_limited:
        return "timeout", f"CPU time limit of {cpu_limit:g} s exceeded"
    if outcome.timed_out:
        limit = limits["compile_time"] if stage == "compile" else limits["wall_time"]
        what = "compile time" if stage == "compile" else "wall time"
        return "timeout", f"{what} limit of {limit:g} s exceeded"
    if outcome.signal == signal.SIGXCPU or (
        outcome.signal == signal.SIGKILL and outcome.cpu >= cpu_rlimit(cpu_limit)[1] - 0.05
    ):
        return "timeout", f"CPU time limit of {cpu_limit:g} s exceeded"
    if stage == "compile" and (outcome.signal or outcome.exit_code):
        return "compile_error", "compilation failed"
    if outcome.signal == signal.SIGXFSZ:
        return "runtime_error", f"file size limit of {limits['file_size_bytes']} bytes exceeded"
    if outcome.signal:
        return "runtime_error", f"killed by {_signal_name(outcome.signal)}"
    if outcome.exit_code:
        return "runtime_error", f"process exited with code {outcome.exit_code}"
    return "ok", ""
