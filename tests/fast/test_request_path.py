"""The request path's own logic — pool, queueing, demand, cancellation, error mapping,
draining — through the real RPC server, service and pool, with local sandboxes
(tests/fast/stack.py). Needs no root; each test takes well under a second."""

from __future__ import annotations

import logging
import os

import pytest
import trio

from sandboxd import errors
from sandboxd.protocol import STREAMS, Method, Status
from tests.fast.stack import local_stack, running, wait_ready

SLEEP_THEN_PRINT = "import time\ntime.sleep({})\nprint('done')"


async def test_a_job_runs_through_the_whole_request_path(tmp_path):
    async with local_stack(tmp_path) as stack:
        await wait_ready(stack.pool, 1)
        result = await stack.client.execute("python", "import sys; print(2 + 2); sys.exit(3)")
    assert (result.status, result.exit_code, result.stdout) == (Status.RUNTIME_ERROR, 3, "4\n")
    assert result.warm  # the ready sandbox's runtime was waiting for it
    assert result.timings["total"] >= result.timings["queue"] >= 0


@pytest.mark.parametrize("streams", [True, False])
async def test_output_streams_as_it_comes_unless_the_client_wants_the_answer_alone(
    tmp_path, streams
):
    program = "import sys\nprint('out', flush=True)\nprint('err', file=sys.stderr)"
    async with local_stack(tmp_path) as stack:
        await wait_ready(stack.pool, 1)
        options = {} if streams else {"stream_output": False}
        async with stack.client.open_execution("python", program, **options) as execution:
            events = [(event.stream, event.data) async for event in execution]
    assert (execution.result.stdout, execution.result.stderr) == ("out\n", "err\n")
    streamed = {
        name: "".join(data for stream, data in events if stream == name) for name in STREAMS
    }
    assert streamed == (
        {"stdout": "out\n", "stderr": "err\n"} if streams else dict.fromkeys(STREAMS, "")
    )


async def test_a_job_beyond_the_pool_waits_for_a_sandbox(tmp_path):
    results = []

    async def job(code: str) -> None:
        results.append(await stack.client.execute("python", code))

    async with local_stack(tmp_path, size=1, max_sandboxes=1) as stack:
        await wait_ready(stack.pool, 1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(job, SLEEP_THEN_PRINT.format(0.3))
            await trio.sleep(0.1)
            nursery.start_soon(job, "print('second')")
    first, second = results
    assert (first.stdout, second.stdout) == ("done\n", "second\n")
    assert second.timings["queue"] > 0.1  # it waited for the only slot to come free


async def test_a_queued_job_gives_up_after_the_queue_timeout(tmp_path):
    async with local_stack(tmp_path, size=1, max_sandboxes=1, queue_timeout=0.2) as stack:
        await wait_ready(stack.pool, 1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stack.client.execute, "python", SLEEP_THEN_PRINT.format(0.5))
            await trio.sleep(0.1)
            with pytest.raises(errors.NoCapacity) as refused:
                await stack.client.execute("python", "print('never')")
    assert refused.value.code == errors.NoCapacity.code


async def test_a_client_that_leaves_mid_job_stops_its_program_and_frees_the_slot(tmp_path):
    async with local_stack(tmp_path, size=1, max_sandboxes=1) as stack:
        await wait_ready(stack.pool, 1)
        code = "import time\nprint('started', flush=True)\ntime.sleep(60)"
        async with stack.client.open_execution("python", code) as execution:
            seen = ""  # output comes in the pieces the program wrote it in
            async for event in execution:
                seen += event.data
                if seen == "started\n":
                    break
            sandbox = running(stack.backend)
            agent = sandbox.child.pid
        with trio.fail_after(5):
            await sandbox.finished.wait()
            while sandbox.child.returncode is None:
                await trio.sleep(0.01)
        assert not os.path.exists(f"/proc/{agent}")
        # The one slot is free again: the next job gets a sandbox, not a queue timeout.
        result = await stack.client.execute("python", "print('next')")
    assert result.stdout == "next\n"


async def test_an_agent_killed_mid_job_gives_a_killed_result_with_the_output_so_far(tmp_path):
    async with local_stack(tmp_path) as stack:
        await wait_ready(stack.pool, 1)
        code = "import time\nprint('before', flush=True)\ntime.sleep(60)"
        async with stack.client.open_execution("python", code) as execution:
            seen = ""
            async for event in execution:
                seen += event.data
                if seen == "before\n":
                    running(stack.backend).kill()
        result = execution.result
    assert result.status == Status.KILLED
    assert result.stdout == "before\n"


@pytest.mark.parametrize(
    ("method", "params", "error"),
    [
        (Method.EXECUTE, {"language": "cobol", "code": ""}, errors.UnsupportedLanguage),
        (Method.EXECUTE, {"language": "python"}, errors.InvalidParams),
        (
            Method.EXECUTE,
            {"language": "python", "code": "", "limits": {"memory_bytes": 2**50}},
            errors.LimitAboveMaximum,
        ),
        (
            Method.EXECUTE,
            {"language": "python", "code": "", "stream_output": "no"},
            errors.InvalidParams,
        ),
        ("no.such.method", {}, errors.MethodNotFound),
    ],
)
async def test_a_wrong_request_gets_its_typed_error(tmp_path, method, params, error):
    async with local_stack(tmp_path, size=0) as stack:
        with pytest.raises(error) as raised:
            await stack.client.call(method, params)
    assert type(raised.value) is error
    assert raised.value.code == error.code


async def test_the_ready_sandboxes_follow_the_demand(tmp_path):
    async with local_stack(tmp_path, size=2, max_sandboxes=3) as stack:
        await wait_ready(stack.pool, 2)
        # No demand yet: the budget is shared evenly among python and plain.
        assert stack.pool.stats()["ready_by_kind"] == {"python": 1, "plain": 1}
        for _ in range(6):
            await stack.client.execute("python", "pass")
        with trio.fail_after(10):
            while stack.pool.stats()["ready_by_kind"] != {"python": 2, "plain": 0}:
                await trio.sleep(0.01)
        assert stack.pool.stats()["ready_memory_bytes"] > 0


async def test_the_daemon_keeps_nothing_per_job_it_has_answered_in_logging(tmp_path):
    """logging keeps every logger it ever named: a logger per sandbox (one per job)
    would grow the root daemon without bound with the jobs any client runs."""
    async with local_stack(tmp_path, size=1, max_sandboxes=1) as stack:
        await stack.client.execute("python", "pass")
        named = len(logging.Logger.manager.loggerDict)
        for _ in range(5):
            await stack.client.execute("python", "pass")
        assert len(logging.Logger.manager.loggerDict) == named


async def test_draining_answers_the_job_in_flight_and_then_refuses(tmp_path):
    results = []

    async def job() -> None:
        results.append(await stack.client.execute("python", SLEEP_THEN_PRINT.format(0.3)))

    async with trio.open_nursery() as nursery, local_stack(tmp_path) as stack:
        await wait_ready(stack.pool, 1)
        nursery.start_soon(job)
        await trio.sleep(0.1)
        # The stack drained on the way out: the job that was running was answered.
    assert [result.stdout for result in results] == ["done\n"]
    with pytest.raises(errors.DaemonUnavailable):
        await stack.client.health()
    assert all(sandbox.child.returncode is not None for sandbox in stack.backend.opened)


async def test_a_sandbox_that_logs_a_lot_while_it_starts_still_starts(tmp_path):
    # As a VMM does that logs its boot (Firecracker at its default level, a serial
    # console): a log pipe nobody reads until the sandbox is ready fills, and blocks it.
    flood = ["sh", "-c", 'head -c 1048576 /dev/zero | tr "\\0" x >&2; exec "$@"', "sh"]
    async with local_stack(tmp_path, wrapper=flood) as stack:
        await wait_ready(stack.pool, 1)
        result = await stack.client.execute("python", "print('up')")
    assert result.stdout == "up\n"


async def test_a_connection_that_sends_nothing_is_closed_after_the_idle_timeout(tmp_path):
    async with local_stack(tmp_path, size=0, idle_timeout=0.2) as stack:
        stream = await trio.open_unix_socket(str(stack.client.socket_path))
        with trio.fail_after(5):
            assert await stream.receive_some(100) == b""  # closed by the daemon
        await stream.aclose()
