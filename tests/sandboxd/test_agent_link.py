"""The daemon's side of the agent protocol, against an agent that breaks it: whatever an
agent sends (it runs beside untrusted code), the daemon keeps no more than the job allows."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from sandboxd.agent_link import AgentLink, Transcript
from sandboxd.errors import AgentError

CAP = 1000


async def ignore(stage: str, stream: str, data: str) -> None:
    pass


async def run_against(messages: list[dict]) -> tuple[Transcript, BaseException | None]:
    """Run a job on a link whose agent sends ``messages`` and then a result."""
    to_agent_send, to_agent_receive = trio.testing.memory_stream_one_way_pair()
    from_agent_send, from_agent_receive = trio.testing.memory_stream_one_way_pair()
    link = AgentLink(to_agent_send, from_agent_receive)
    transcript = Transcript(CAP)
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:

        async def agent() -> None:
            await to_agent_receive.receive_some()  # the job
            for message in [*messages, {"type": "result", "status": "ok"}]:
                await from_agent_send.send_all(json.dumps(message).encode() + b"\n")

        nursery.start_soon(agent)
        with trio.fail_after(10):
            try:
                await link.run({"type": "job"}, ignore, transcript)
            except AgentError as exc:
                failure = exc
    return transcript, failure


async def test_output_under_the_protocols_names_is_kept_up_to_the_cap():
    chunk = {"type": "output", "stage": "run", "stream": "stdout", "data": "x" * 100}
    transcript, failure = await run_against([chunk] * 50)
    assert failure is None
    assert transcript.text("run", "stdout") == "x" * CAP
    assert transcript.truncated("run", "stdout")


@pytest.mark.parametrize(
    "names",
    [{"stage": "run", "stream": "stdout-1"}, {"stage": "run-1", "stream": "stdout"}],
    ids=["stream", "stage"],
)
async def test_output_under_names_the_protocol_lacks_is_refused(names):
    # Each made-up name would be a transcript of its own, each up to the cap.
    _, failure = await run_against([{"type": "output", **names, "data": "x"}])
    assert isinstance(failure, AgentError)
    assert "malformed output" in str(failure)


CHUNK = {"type": "output", "stage": "run", "stream": "stdout", "data": "x"}


async def test_a_message_that_would_parse_to_far_more_than_its_bytes_is_refused():
    # Under the line cap (1 MiB), but 200,000 dicts, 13 MB parsed: an agent's
    # messages are read one at a time, but for every sandbox at once.
    padding = [{}] * 200_000
    _, failure = await run_against([{**CHUNK, "padding": padding}])
    assert isinstance(failure, AgentError)
    assert "JSON values" in str(failure)


async def test_a_message_nested_deeper_than_the_parser_goes_is_refused():
    # Within the values cap, but deeper than json's recursion: an AgentError (which
    # kills the sandbox), not a RecursionError escaping the daemon's error tree.
    to_agent_send, _unread = trio.testing.memory_stream_one_way_pair()
    from_agent_send, from_agent_receive = trio.testing.memory_stream_one_way_pair()
    link = AgentLink(to_agent_send, from_agent_receive)
    await from_agent_send.send_all(b"[" * 50_000 + b"]" * 50_000 + b"\n")
    with pytest.raises(AgentError, match="not JSON"):
        await link.run({"type": "job"}, ignore, Transcript(CAP))
