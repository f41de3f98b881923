"""The blocking client's connections, shared by the callers it acts for (a gateway's
MCP keys): no caller takes them all, and a free one goes to who holds fewest."""

from __future__ import annotations

import threading
from contextlib import ExitStack

from sandboxctl.client import _Slots


def test_a_free_connection_goes_to_the_waiting_caller_holding_fewest():
    slots = _Slots(3)  # one caller holds two at most
    first, second, bobs = ExitStack(), ExitStack(), ExitStack()
    first.enter_context(slots.held("alice", None))
    second.enter_context(slots.held("alice", None))
    bobs.enter_context(slots.held("bob", None))  # at once: alice may not take a third
    order: list[str] = []
    taken = {name: threading.Event() for name in ("alice", "carol")}
    leave = threading.Event()

    def wait(caller: str) -> None:
        with slots.held(caller, None):
            order.append(caller)
            taken[caller].set()
            leave.wait(5)

    threads = [threading.Thread(target=wait, args=(name,)) for name in ("alice", "carol")]
    for thread in threads:
        thread.start()
        threading.Event().wait(0.1)  # alice waits first
    first.close()  # alice holds one, bob one, carol none: carol goes first
    assert taken["carol"].wait(5)
    assert not taken["alice"].wait(0.3)
    bobs.close()
    assert taken["alice"].wait(5)
    assert order == ["carol", "alice"]
    leave.set()
    for thread in threads:
        thread.join(5)
    second.close()


def test_what_a_caller_checks_while_it_waits_ends_its_wait():
    slots = _Slots(1)

    class Cancelled(Exception):
        pass

    def cancelled() -> None:
        raise Cancelled

    with slots.held("alice", None):
        try:
            with slots.held("bob", cancelled):
                raise AssertionError("bob got a slot that alice holds")
        except Cancelled:
            pass
    with slots.held("bob", None):  # bob's wait left nothing behind
        pass


def test_a_callers_second_wait_given_up_leaves_its_first_in_the_queue():
    """Two waiters of one caller, the second cancelled: it took the first one's place
    out of the queue (removed by equality), which then never got its turn, and the
    share was wedged for every caller."""
    slots = _Slots(2)
    alice, bob = ExitStack(), ExitStack()
    alice.enter_context(slots.held("alice", None))
    bob.enter_context(slots.held("bob", None))
    first = threading.Event()
    leave = threading.Event()

    def wait() -> None:
        with slots.held("alice", None):
            first.set()
            leave.wait(5)

    waiting = threading.Thread(target=wait)
    waiting.start()
    threading.Event().wait(0.1)

    def cancelled() -> None:
        raise TimeoutError

    try:
        with slots.held("alice", cancelled):
            raise AssertionError("a second slot while both are held")
    except TimeoutError:
        pass
    alice.close()
    bob.close()
    assert first.wait(5)
    leave.set()
    waiting.join(5)
    with slots.held("carol", None):
        pass
