"""Sessions' own logic — lifecycle, files, limits, reaping, caps — through the real RPC
server, service, pool and agent, with local sandboxes (tests/fast/stack.py)."""

from __future__ import annotations

import json
import os

import pytest
import trio

from sandboxd import errors
from sandboxd.protocol import Method, Status
from tests.fast.stack import local_stack

READ_CSV_WRITE_TOTAL = """
import csv
rows = list(csv.reader(open("data/in.csv")))
total = sum(int(row[1]) for row in rows[1:])
open("out/total.txt", "w").write(str(total))
print("rows", len(rows) - 1)
"""


async def test_files_persist_between_execs_and_come_back_byte_for_byte(tmp_path):
    async with local_stack(tmp_path, max_sandboxes=4) as stack:
        session = await stack.client.session("python")
        async with session:
            await session.write_file("data/in.csv", "name,n\na,1\nb,41\n")
            first = await session.exec("import os; os.mkdir('out'); print(sorted(os.listdir()))")
            assert first.status is Status.OK, first
            ran = await session.exec(READ_CSV_WRITE_TOTAL)
            assert (ran.status, ran.stdout) == (Status.OK, "rows 2\n"), ran
            assert await session.read_file("out/total.txt") == b"42"
            blob = bytes(range(256)) * 5
            await session.write_file("blob.bin", blob)
            assert await session.read_file("blob.bin") == blob
            names = {entry["name"]: entry for entry in await session.list_files()}
            assert {"data", "out", "blob.bin", "main.py"} <= set(names)
            assert names["blob.bin"] == {"name": "blob.bin", "type": "file", "size": len(blob)}
            await session.remove_file("data")
            assert "data" not in {entry["name"] for entry in await session.list_files()}
            info = await session.refresh()
            assert info["execs"] == 2 and info["state"] == "idle"
        listed = await stack.client.sessions()
    assert listed[0]["id"] == session.id and listed[0]["ended"] == "closed by its owner"


async def test_a_nodes_session_ids_start_with_its_name(tmp_path):
    """So that a balancer in front of several nodes sends a session's calls to its node
    (contrib/haproxy.cfg)."""
    async with local_stack(tmp_path, max_sandboxes=4, sessions={"node": "node2"}) as stack:
        session = await stack.client.session()
        async with session:
            assert session.id.startswith("node2-") and len(session.id) == len("node2-") + 24
            assert (await session.exec("print(1)")).stdout == "1\n"


async def test_a_closed_session_is_gone_for_every_call(tmp_path):
    async with local_stack(tmp_path, max_sandboxes=4) as stack:
        session = await stack.client.session()
        await session.close()
        for call in (
            session.exec("print(1)"),
            session.read_file("x"),
            session.write_file("x", "y"),
            session.refresh(),
        ):
            with pytest.raises(errors.SessionNotFound):
                await call
        await session.close()  # closing again is no error
        assert stack.pool.stats()["busy"] == 0


async def test_an_idle_session_is_reaped_and_listed_as_such(tmp_path):
    async with local_stack(tmp_path, max_sandboxes=4) as stack:
        session = await stack.client.session(idle_timeout=0.3)
        await session.exec("print(1)")
        await trio.sleep(0.8)
        with pytest.raises(errors.SessionNotFound):
            await session.exec("print(2)")
        [listed] = await stack.client.sessions()
    assert listed["ended"] == "idle for 0.3 s"


async def test_an_owner_cannot_hold_more_sessions_than_its_share(tmp_path):
    settings = {"max_per_owner": 2}
    async with local_stack(tmp_path, max_sandboxes=8, sessions=settings) as stack:
        first, second = [await stack.client.session() for _ in range(2)]
        with pytest.raises(errors.TooManySessions) as refused:
            await stack.client.session()
        assert "sessions.max_per_owner" in refused.value.message
        result = await stack.client.execute("python", "print('one-shot jobs still run')")
        assert result.ok
        await first.close()
        third = await stack.client.session()
        await second.close()
        await third.close()


async def test_a_session_keeps_its_limits_and_refuses_to_change_them_per_exec(tmp_path):
    async with local_stack(tmp_path, max_sandboxes=4) as stack:
        limits = {"memory_bytes": 256 * 2**20, "processes": 32}
        async with await stack.client.session(limits=limits) as session:
            assert session.info["limits"]["memory_bytes"] == 256 * 2**20
            with pytest.raises(errors.InvalidParams) as refused:
                await session.exec("print(1)", limits={"memory_bytes": 2**30})
            assert refused.value.data["field"] == "limits.memory_bytes"
            slow = await session.exec("import time; time.sleep(5)", timeout=0.3)
            assert slow.status is Status.TIMEOUT
            after = await session.exec("print('still here')")
            assert after.stdout == "still here\n"


async def test_paths_out_of_the_working_directory_are_refused(tmp_path):
    async with (
        local_stack(tmp_path, max_sandboxes=4) as stack,
        await stack.client.session() as session,
    ):
        for path in ("../x", "/etc/passwd", "a/../../x", ""):
            with pytest.raises(errors.InvalidParams):
                await session.read_file(path)
        with pytest.raises(errors.InvalidParams) as missing:
            await session.read_file("nothing-here")
        assert "No such file" in missing.value.message


async def test_cells_share_one_interpreter_and_give_the_last_value(tmp_path):
    async with (
        local_stack(tmp_path, max_sandboxes=4) as stack,
        await stack.client.session() as session,
    ):
        first = await session.exec("x = 41\nimport json", cell=True)
        assert first.status is Status.OK and first.cell.fresh and first.cell.kept, first
        assert first.cell.value is None
        second = await session.exec("print(x + 1)\nx + 1", cell=True)
        assert (second.stdout, second.cell.value, second.cell.fresh) == ("42\n", "42", False)
        failed = await session.exec("y = 1\nundefined_name", cell=True)
        assert failed.status is Status.RUNTIME_ERROR and failed.cell.kept
        assert failed.message == "the cell raised NameError"
        assert failed.stderr.startswith("Traceback (most recent call last):\n")
        assert 'File "<cell 3>", line 2, in <module>\n    undefined_name\n' in failed.stderr
        typo = await session.exec("def f(:\n", cell=True)
        assert typo.status is Status.RUNTIME_ERROR and "SyntaxError" in typo.stderr
        assert (
            await session.exec("print(x, y, input())", stdin="in\n", cell=True)
        ).stdout == "41 1 in\n"
        ended = await session.exec("import sys; sys.exit(3)", cell=True)
        assert (ended.exit_code, ended.cell.kept) == (3, False)
        again = await session.exec("print('x' in globals())", cell=True)
        assert (again.stdout, again.cell.fresh) == ("False\n", True)
        slow = await session.exec("import time; time.sleep(10)", cell=True, timeout=0.5)
        assert slow.status is Status.TIMEOUT and not slow.cell.kept
        program = await session.exec("print('a program beside the cells')")
        assert program.ok and program.cell is None


async def test_a_session_outlives_a_caller_who_leaves_mid_exec(tmp_path):
    async with (
        local_stack(tmp_path, max_sandboxes=4) as stack,
        await stack.client.session() as session,
    ):
        await session.exec("x = 1", cell=True)
        code = "import time\nprint('started', flush=True)\ntime.sleep(60)"
        params = {"id": session.id, "code": code}
        async with stack.client.open_call(Method.SESSION_EXEC, params) as execution:
            async for event in execution:
                assert event.data.startswith("started")
                break  # and leave: the connection closes
        after = await session.exec("print('next')")
        assert (after.status, after.stdout) == (Status.OK, "next\n")
        assert (await session.refresh())["state"] == "idle"


async def test_streamed_stdin_reaches_a_program_in_a_session(tmp_path):
    async with (
        local_stack(tmp_path, max_sandboxes=4) as stack,
        await stack.client.session() as session,
    ):
        params = {"id": session.id, "code": "print(input()[::-1])", "interactive": True}
        async with stack.client.open_call(Method.SESSION_EXEC, params) as execution:
            await execution.send_stdin("olleh\n", eof=True)
            async for _ in execution:
                pass
        assert execution.result.stdout == "hello\n"


async def test_a_session_past_its_time_to_live_ends(tmp_path):
    async with local_stack(tmp_path, max_sandboxes=4) as stack:
        session = await stack.client.session(ttl=0.3)
        await trio.sleep(0.8)
        with pytest.raises(errors.SessionNotFound):
            await session.exec("print(1)")
        [listed] = await stack.client.sessions()
    assert listed["ended"] == "its time to live of 0.3 s was up"


# --- attacks on a session's own protocol ---------------------------------------------

FIND_REPLIES = (
    "import os, re\n"
    "boot = open('/proc/self/cmdline', 'rb').read().split(b'\\0')[2].decode()\n"
    "replies = int(re.search(r'main\\((\\d+), (\\d+)\\)', boot).group(2))\n"
)


async def test_a_cell_that_forges_its_reply_confuses_only_itself(tmp_path):
    async with (
        local_stack(tmp_path, max_sandboxes=4) as stack,
        await stack.client.session() as session,
    ):
        garbage = await session.exec(
            FIND_REPLIES + "os.write(replies, b'not json\\n')\n", cell=True
        )
        assert not garbage.cell.kept  # the interpreter is not trusted on
        after = await session.exec("print('fresh')", cell=True)
        assert (after.stdout, after.cell.fresh) == ("fresh\n", True)
        forged = await session.exec(
            FIND_REPLIES + 'os.write(replies, b\'{"ok": true, "value": "forged"}\\n\')\n'
            "import time; time.sleep(0.3); print('the real end')",
            cell=True,
        )
        assert forged.cell.value == "forged"  # its own words, as a cell's value is
        await session.write_file("x.txt", "still in step")
        assert await session.read_file("x.txt") == b"still in step"
        program = await session.exec("print('a program')")
        assert (program.status, program.stdout) == (Status.OK, "a program\n")


async def test_nothing_of_a_cell_runs_between_calls(tmp_path):
    async with (
        local_stack(tmp_path, max_sandboxes=4) as stack,
        await stack.client.session() as session,
    ):
        ticker = (
            "import threading, time\n"
            "def tick():\n"
            "    while True:\n"
            "        open('ticks', 'a').write('.'); time.sleep(0.02)\n"
            "threading.Thread(target=tick, daemon=True).start(); time.sleep(0.1)"
        )
        assert (await session.exec(ticker, cell=True)).cell.kept
        before = await session.read_file("ticks")
        await trio.sleep(0.3)
        assert await session.read_file("ticks") == before  # stopped between calls
        await session.exec("import time; time.sleep(0.2)", cell=True)
        assert len(await session.read_file("ticks")) > len(before)  # and runs in a cell


async def test_input_left_unread_by_a_program_does_not_answer_the_next_call(tmp_path):
    async with (
        local_stack(tmp_path, max_sandboxes=4) as stack,
        await stack.client.session() as session,
    ):
        await session.write_file("a.txt", "a")
        params = {"id": session.id, "code": "print('no input read')", "interactive": True}
        async with stack.client.open_call(Method.SESSION_EXEC, params) as execution:
            for _ in range(50):
                await execution.send_stdin("x" * 60000)
            async for _ in execution:
                pass
        assert execution.result.stdout == "no input read\n"
        assert await session.read_file("a.txt") == b"a"
        await session.write_file("b.txt", "b")
        assert await session.read_file("b.txt") == b"b"


async def test_names_a_program_made_cannot_break_a_listing_or_a_write(tmp_path):
    async with (
        local_stack(tmp_path, max_sandboxes=4) as stack,
        await stack.client.session() as session,
    ):
        made = await session.exec(
            "import os\n"
            "open(b'\\xff-not-utf8', 'w').close()\n"
            "os.mkdir('.sandboxd-write'); os.mkdir('many')\n"
            "for n in range(4000):\n"
            "    open(f'many/{n:04}' + 'x' * 200, 'w').close()\n"
        )
        assert made.ok, made.stderr
        names = {entry["name"] for entry in await session.list_files()}
        assert "\ufffd-not-utf8" in names and ".sandboxd-write" in names
        many = await stack.client.call(
            Method.SESSION_LIST_FILES, {"id": session.id, "path": "many"}
        )
        assert many["truncated"] and 0 < len(many["entries"]) < 4000
        await session.write_file("written.txt", "beside a planted staging name")
        assert await session.read_file("written.txt") == b"beside a planted staging name"


async def test_unread_file_answers_wait_for_the_uids_budget(tmp_path):
    budget = 2 * 2**20
    settings = {"max_file_bytes": 2**20}
    async with (
        local_stack(
            tmp_path,
            max_sandboxes=4,
            sessions=settings,
            pending_bytes_per_uid=budget,
            max_request_bytes=budget,
        ) as stack,
        await stack.client.session() as session,
    ):
        await session.write_file("big.bin", os.urandom(2**20))
        request = {"jsonrpc": "2.0", "method": "session.read_file", "id": 1}
        request["params"] = {"id": session.id, "path": "big.bin"}
        readers = []
        for _ in range(12):  # each asks for the file and reads nothing
            sock = trio.socket.socket(trio.socket.AF_UNIX)
            await sock.connect(str(tmp_path / "sock"))
            await sock.send(json.dumps(request).encode() + b"\n")
            readers.append(sock)
        await trio.sleep(1.5)
        [account] = stack.server.peers._accounts.values()
        # What the daemon holds for them: its budget, and one answer at most beyond.
        assert account.output <= budget + 4 * 2**20 // 3 + 4
        for sock in readers:
            sock.close()
        with trio.fail_after(10):
            while account.output:
                await trio.sleep(0.05)
        assert await session.read_file("big.bin") != b""
