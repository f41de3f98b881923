"""Sessions: a sandbox of the pool kept across calls, with files in and out.

A session is created for an owner (the peer uid on the socket) and holds one sandbox,
whose agent then serves request after request (guest/agent/session.py): executions,
whose files and working directory persist from one to the next while each one's
processes end with it, and file operations in the working directory. Only its owner
can see or use it; to anybody else it does not exist (SessionNotFound either way).

The memory, processes, file size and network of a session's sandbox are set once, at
its creation; each execution has its own time and output limits. A session ends when
its owner closes it, when it has been idle (no call) for its idle timeout, when it has
lived its time to live, when its sandbox is lost, or when the daemon stops; its sandbox
is then torn down like any other. The owner's last ended sessions stay listed, with why.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import math
import pwd
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from sandboxd.agent_link import MAX_AGENT_LINE
from sandboxd.backends.base import Sandbox
from sandboxd.config import SessionsConfig
from sandboxd.errors import AgentError, InvalidParams, SessionNotFound, TooManySessions
from sandboxd.job import (
    Job,
    check_path,
    decode_content,
    flag,
    only_fields,
    parse_job,
    unicode_text,
)
from sandboxd.languages import Language
from sandboxd.limits import Limits, resolve_limits
from sandboxd.protocol import SESSION_CREATE_FIELDS, SESSION_EXEC_FIELDS, SESSION_LIMITS
from sandboxd.service import OutputSink, Service, result_of
from sandboxd.stdin_stream import StdinStream

log = logging.getLogger(__name__)

Reserve = Callable[[int], Awaitable[None]]  # holds an answer's bytes in the caller's budget

ENDED_KEPT = 8  # per owner: the sessions that ended, listed with why...
ENDED_REMEMBERED = 256  # ...of the last that ended on the server
CLOSE_TIMEOUT = 10.0  # for a closed session's sandbox to be torn down
# A file write needs this much of the session's free memory: the agent holds the message
# and the file content while it writes (about 3 times the file), with room to spare.
WRITE_MEMORY_FACTOR = 3
WRITE_MEMORY_SPARE = 8 * 2**20


@dataclass(frozen=True)
class Owner:
    """Whose a session is: the peer uid on the socket, and for a delegate (the HTTP
    gateway) the client it acts for (an API key's id), each an owner of its own."""

    uid: int
    on_behalf_of: str = ""

    def __str__(self) -> str:
        return f"uid {self.uid}" + (f" for {self.on_behalf_of!r}" if self.on_behalf_of else "")


@dataclass
class Session:
    id: str
    owner: Owner
    language: Language
    limits: Limits  # its sandbox's; the time and output limits are each exec's defaults
    network: bool
    ttl: float
    idle_timeout: float
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=trio.current_time)
    expires: float = math.inf  # on trio's clock: when its time to live is up
    execs: int = 0
    ending: bool = False  # the reaper ends it once its running call is done
    ended: str = ""  # why, once it has
    sandbox: Sandbox | None = None  # while it holds one
    sandbox_id: str = ""
    lock: trio.Lock = field(default_factory=trio.Lock)  # one call at a time
    end_now: trio.Event = field(default_factory=trio.Event)

    @property
    def busy(self) -> bool:
        """A call is running (or the session is being ended, once its call is done)."""
        return self.lock.locked()

    def deadline(self) -> float:
        """On trio's clock: when it ends unless used (idle) before its time to live."""
        if self.ending or self.sandbox is None:
            return math.inf  # already on its way out, or not yet in
        if self.busy:
            return self.expires
        return min(self.expires, self.last_used + self.idle_timeout)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "language": self.language.name,
            "state": "ended" if self.ended else ("busy" if self.busy else "idle"),
            "ended": self.ended or None,
            "created": round(self.created, 3),
            "expires": round(self.created + self.ttl, 3),
            "idle_timeout": self.idle_timeout,
            "execs": self.execs,
            "network": self.network,
            "limits": self.limits.to_dict(),
            "sandbox_id": self.sandbox_id,
        }


def _seconds(params: Mapping[str, Any], name: str, maximum: float) -> float:
    value = params.get(name)
    if value is None:
        return maximum
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidParams.field(name, "expected a number of seconds")
    if value <= 0 or value > maximum:
        raise InvalidParams.field(name, f"expected more than 0 and at most {maximum:g} seconds")
    return float(value)


def _not_found(session_id: str) -> SessionNotFound:
    """The one answer for an id that is not the caller's: never existed, ended, or
    somebody else's."""
    return SessionNotFound(f"no session {session_id!r}", id=session_id)


async def _first(*events: trio.Event) -> None:
    """Wait until one of ``events`` is set."""
    async with trio.open_nursery() as nursery:
        for event in events:

            async def wait(event: trio.Event = event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)


def _uids(users: tuple[str, ...]) -> set[int]:
    """The uids of the users named (a user not on this host is no delegate)."""
    found = set()
    for name in users:
        with contextlib.suppress(KeyError):
            found.add(pwd.getpwnam(name).pw_uid)
    return found


class Sessions:
    """Every open session, and the ones that ended lately, by owner."""

    def __init__(self, service: Service, settings: SessionsConfig) -> None:
        self.service = service
        self.settings = settings
        self.max_total = settings.total(service.pool.max_sandboxes)
        self.delegates = {0} | _uids(settings.delegates)
        self._open: dict[str, Session] = {}
        self._ended: deque[Session] = deque(maxlen=ENDED_REMEMBERED)
        self._nursery: trio.Nursery | None = None
        self._changed = trio.lowlevel.ParkingLot()  # a session opened, was used or ended

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the sessions' sandboxes and end the idle and expired ones, until
        cancelled (which ends every session)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._reap)
            task_status.started()

    # --- lifecycle -----------------------------------------------------------------

    def owner(self, uid: int, on_behalf_of: Any) -> Owner:
        """The owner a call of peer ``uid`` acts as; InvalidParams if it may not act for
        ``on_behalf_of``."""
        if on_behalf_of is None:
            return Owner(uid)
        if uid not in self.delegates:
            raise InvalidParams.field(
                "on_behalf_of", "only root and sessions.delegates may act for others"
            )
        if not isinstance(on_behalf_of, str) or not 0 < len(on_behalf_of) <= 200:
            raise InvalidParams.field("on_behalf_of", "expected a name of up to 200 characters")
        return Owner(uid, on_behalf_of)

    async def create(self, owner: Owner, params: Any) -> dict[str, Any]:
        params = only_fields(params, SESSION_CREATE_FIELDS)
        language = self.service.languages_table.resolve(
            unicode_text(params.get("language", "python"), "language")
        )
        limits = resolve_limits(params.get("limits"), params.get("timeout"), self.service.limits)
        network = flag(params, "network")
        egress = self.service.egress_for(network)
        mine = sum(1 for session in self._open.values() if session.owner == owner)
        if mine >= self.settings.max_per_owner:
            raise TooManySessions(
                f"{owner} already has {mine} sessions open, the most one owner may "
                "(sessions.max_per_owner): close one first",
                maximum=self.settings.max_per_owner,
            )
        if len(self._open) >= self.max_total:
            raise TooManySessions(
                f"the server holds its most sessions at once ({self.max_total}, "
                "sessions.max_total): try again later",
                maximum=self.max_total,
            )
        node = self.settings.node
        session = Session(
            id=f"{node}-{secrets.token_hex(12)}" if node else secrets.token_hex(12),
            owner=owner,
            language=language,
            limits=limits,
            network=network,
            ttl=_seconds(params, "ttl", self.settings.max_ttl),
            idle_timeout=_seconds(params, "idle_timeout", self.settings.idle_timeout),
        )
        session.expires = trio.current_time() + session.ttl
        self._open[session.id] = session  # counted while its sandbox is on the way
        try:
            await self._nursery_of().start(self._hold, session, egress)
        except BaseException:
            self._open.pop(session.id, None)
            raise
        log.info(
            "session %s opened for %s: %s, sandbox %s",
            session.id,
            owner,
            language.name,
            session.sandbox_id,
        )
        self._changed.unpark_all()
        return session.describe()

    async def _hold(
        self, session: Session, egress: Any, *, task_status: trio.TaskStatus[None]
    ) -> None:
        """The session's sandbox, from the pool, until the session ends."""
        pool = self.service.pool
        try:
            # A plain sandbox: its agent would drop a warm runtime (the session's files
            # are the caller's from the start), so none is taken from those who warm.
            async with pool.sandbox("") as sandbox:
                attached = egress.attached(sandbox.network_namespace()) if egress else None
                async with attached or contextlib.nullcontext():
                    await sandbox.open_session(session.limits)
                    session.sandbox, session.sandbox_id = sandbox, sandbox.id
                    sandbox.session = session.id
                    task_status.started()
                    await _first(session.end_now, sandbox.finished)
                    if not session.end_now.is_set():
                        self._retire(session, "its sandbox was lost: it died")
        finally:
            if session.sandbox is not None:  # else create() fails, and says why
                self._retire(session, session.ended or "the daemon stopped")
            session.sandbox = None  # an ended session, listed a while, holds nothing

    def _retire(self, session: Session, why: str) -> None:
        if self._open.pop(session.id, None) is None:
            return
        session.ended = why
        session.end_now.set()
        self._ended.append(session)
        log.info("session %s of %s ended: %s", session.id, session.owner, why)
        self._changed.unpark_all()

    async def _end(self, session: Session, why: str) -> None:
        """End ``session`` and wait (a while) until its sandbox is gone."""
        sandbox = session.sandbox
        self._retire(session, why)
        if sandbox is not None:
            with trio.move_on_after(CLOSE_TIMEOUT):
                await sandbox.gone.wait()

    async def _reap(self) -> None:
        """End every session whose idle timeout or time to live is up."""
        while True:
            now = trio.current_time()
            for session in list(self._open.values()):
                if session.deadline() > now:
                    continue
                if now >= session.expires:
                    why = f"its time to live of {session.ttl:g} s was up"
                else:
                    why = f"idle for {session.idle_timeout:g} s"
                session.ending = True
                self._nursery_of().start_soon(self._end_when_free, session, why)
            deadlines = [session.deadline() for session in self._open.values()]
            with trio.move_on_at(min(deadlines, default=math.inf)):
                await self._changed.park()

    async def _end_when_free(self, session: Session, why: str) -> None:
        async with session.lock:  # a running exec ends first (it has its own time limit)
            await self._end(session, why)

    def _nursery_of(self) -> trio.Nursery:
        assert self._nursery is not None, "run() first"
        return self._nursery

    async def close_all(self) -> None:
        """The daemon stops: end every session, each once its running call is done."""
        async with trio.open_nursery() as closing:
            for session in list(self._open.values()):
                closing.start_soon(self._end_when_free, session, "the daemon stopped")

    # --- calls in a session ----------------------------------------------------------

    def _find(self, owner: Owner, session_id: Any) -> Session:
        if not isinstance(session_id, str) or not session_id:
            raise InvalidParams.field("id", "expected a session id")
        session = self._open.get(session_id)
        if session is None or session.owner != owner or session.sandbox is None:
            raise _not_found(session_id)
        return session

    @contextlib.asynccontextmanager
    async def _using(self, owner: Owner, session_id: Any) -> Any:
        """The session, its sandbox for this call only (calls wait their turn). A call
        whose turn comes once the session is up (its time to live, or its end on the
        way) finds no session: calls queued behind each other would otherwise keep it
        for as long as they take."""
        session = self._find(owner, session_id)
        try:
            async with session.lock:
                if session.ended or session.ending or trio.current_time() >= session.expires:
                    raise _not_found(session_id)
                self._changed.unpark_all()  # busy: no idle timeout runs
                sandbox = session.sandbox
                assert sandbox is not None
                try:
                    yield session, sandbox
                except BaseException:
                    # The caller left mid-call (cancelled): the agent may still answer.
                    if sandbox.link.owes_answer and not await sandbox.settle():
                        self._retire(session, "its sandbox was lost: a call was cut off")
                    raise
                if sandbox.link.owes_answer:  # streamed input cut off as its run ended
                    sandbox.kill()
                    self._retire(session, "its sandbox was lost: input to it was cut off")
        finally:
            session.last_used = trio.current_time()
            self._changed.unpark_all()  # idle from now (the lock is free)

    def _job(self, session: Session, params: Any) -> Job:
        params = only_fields(params, SESSION_EXEC_FIELDS)
        limits = params.get("limits")
        fixed = [n for n in SESSION_LIMITS if isinstance(limits, dict) and limits.get(n)]
        if fixed:
            raise InvalidParams.field(
                f"limits.{fixed[0]}", "is the session's, set by session.create"
            )
        job = parse_job(
            {**params, "language": params.get("language") or session.language.name},
            self.service.languages_table,
            self.service.limits,
            SESSION_EXEC_FIELDS,
        )
        limits = dataclasses.replace(
            job.limits, **{name: getattr(session.limits, name) for name in SESSION_LIMITS}
        )
        return dataclasses.replace(job, limits=limits, network=session.network)

    async def exec(
        self, owner: Owner, params: Any, on_output: OutputSink, stdin: StdinStream | None = None
    ) -> dict[str, Any]:
        """Run one job in the session's sandbox: ``execute``'s record."""
        start = trio.current_time()
        session = self._find(owner, params.get("id") if isinstance(params, dict) else None)
        job = self._job(session, params)
        async with self._using(owner, session.id) as (session, sandbox):
            queued = trio.current_time() - start  # behind the session's other calls
            run = await sandbox.run(
                job.agent_message(), job.limits, on_output, stdin if job.interactive else None
            )
            session.execs += 1
        result = result_of(run, job, sandbox.id)
        result.timings["queue"] = round(queued, 6)
        result.timings["total"] = round(trio.current_time() - start, 6)
        if run.record is None:
            await self._end(session, f"its sandbox was lost: {run.lost}")
        return result.to_dict()

    async def _file_request(
        self,
        owner: Owner,
        session_id: Any,
        message: Callable[[Session, Sandbox], dict[str, Any]],
        reserve: Reserve | None = None,
        answer_bytes: int = 0,
    ) -> tuple[dict[str, Any], bytes]:
        """The agent's reply to a file request (``message`` makes it, in the session's
        turn), and its data; InvalidParams naming the path if the agent could not carry
        it out. An answer of up to ``answer_bytes`` is ``reserve``d first, in the turn:
        what a caller's requests hold waiting is only their request lines."""
        async with self._using(owner, session_id) as (session, sandbox):
            request = message(session, sandbox)
            if reserve is not None:
                await reserve(answer_bytes)
            try:
                reply, data = await sandbox.request(request, request.get("max_bytes", 0))
            except AgentError as exc:
                lost = exc.message
            else:
                if reply["type"] == "error":
                    raise InvalidParams.field("path", str(reply.get("message", "failed")))
                return reply, data
        await self._end(session, f"its sandbox was lost: {lost}")
        raise SessionNotFound(f"session {session.id!r} ended: {session.ended}", id=session.id)

    def _max_file(self, session_limits: Limits) -> int:
        return min(self.settings.max_file_bytes, session_limits.file_size_bytes)

    async def write_file(self, owner: Owner, params: Any) -> dict[str, Any]:
        """Create or replace a file (or, with ``append``, add to one: a client sends a
        large file in pieces, each within the request cap)."""
        params = only_fields(params, ("id", "path", "content", "encoding", "append"))
        path = check_path(params.get("path"), "path")
        unicode_text(params.get("content"), "content")
        append = flag(params, "append")

        def message(session: Session, sandbox: Sandbox) -> dict[str, Any]:
            data = decode_content(params, "")  # in the session's turn: one copy at a time
            limit = self._max_file(session.limits)
            if len(data) > limit:
                raise InvalidParams.field("content", f"more than the {limit} bytes a file may hold")
            room = sandbox.memory_room()
            # The agent holds the message (base64) and the file while it writes it, and
            # its files share the session's memory: it must not be left without any.
            if room is not None and WRITE_MEMORY_FACTOR * len(data) + WRITE_MEMORY_SPARE > room:
                raise InvalidParams.field(
                    "content",
                    f"the session's memory is full: {max(room, 0) // 2**20} MiB free, and "
                    "its files count toward it; remove some first",
                )
            content = base64.b64encode(data).decode()
            return {"type": "file.write", "path": path, "content": content, "append": append,
                    "max_bytes": limit}  # fmt: skip

        reply, _ = await self._file_request(owner, params.get("id"), message)
        return {"path": path, "size": reply.get("size", 0)}

    async def read_file(self, owner: Owner, params: Any, reserve: Reserve) -> dict[str, Any]:
        """A file's content, its size reserved in the caller's output budget (``reserve``)
        before it is read."""
        params = only_fields(params, ("id", "path"))
        path = check_path(params.get("path"), "path")
        session = self._find(owner, params.get("id"))
        limit = self._max_file(session.limits)
        _, data = await self._file_request(
            owner,
            session.id,
            lambda session, _: {"type": "file.read", "path": path, "max_bytes": limit},
            reserve,
            answer_bytes=4 * limit // 3 + 4,  # in base64
        )
        return {
            "path": path,
            "size": len(data),
            "content": base64.b64encode(data).decode(),
            "encoding": "base64",
        }

    async def list_files(self, owner: Owner, params: Any, reserve: Reserve) -> dict[str, Any]:
        params = only_fields(params, ("id", "path"))
        path = params.get("path") or "."
        if path != ".":
            path = check_path(path, "path")
        reply, _ = await self._file_request(
            owner,
            params.get("id"),
            lambda session, _: {"type": "file.list", "path": path},
            reserve,
            answer_bytes=MAX_AGENT_LINE,  # the most a listing can be
        )
        entries, truncated = reply.get("entries", []), reply.get("truncated", False)
        return {"path": path, "entries": entries, "truncated": truncated}

    async def remove_file(self, owner: Owner, params: Any) -> dict[str, Any]:
        params = only_fields(params, ("id", "path"))
        path = check_path(params.get("path"), "path")
        remove = {"type": "file.remove", "path": path}
        await self._file_request(owner, params.get("id"), lambda session, _: remove)
        return {"path": path}

    # --- looking at sessions -------------------------------------------------------

    async def info(self, owner: Owner, params: Any) -> dict[str, Any]:
        params = only_fields(params, ("id",))
        return self._find(owner, params.get("id")).describe()

    async def list(self, owner: Owner, params: Any) -> dict[str, Any]:
        only_fields(params, ())
        sessions = [s for s in self._open.values() if s.owner == owner and s.sandbox]
        ended = [s for s in self._ended if s.owner == owner][-ENDED_KEPT:]
        return {"sessions": [s.describe() for s in (*sessions, *reversed(ended))]}

    async def close(self, owner: Owner, params: Any) -> dict[str, Any]:
        params = only_fields(params, ("id",))
        session = self._find(owner, params.get("id"))
        async with session.lock:
            await self._end(session, "closed by its owner")
        return session.describe()

    def stats(self) -> dict[str, Any]:
        return {"open": len(self._open), "max": self.max_total}
