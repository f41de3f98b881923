"""What the host lets its VMs share with one another, which Firecracker's production host
setup advises turning off: SMT (sibling threads share a core's caches and buffers) and
KSM (the kernel merges equal pages across VMs, a timing side channel). Reported in
``status``; the operator decides."""

from __future__ import annotations

SMT_CONTROL = "/sys/devices/system/cpu/smt/control"
KSM_RUN = "/sys/kernel/mm/ksm/run"
KSM_STATES = {"0": "off", "1": "on: equal pages are merged across VMs", "2": "unmerging"}


def _read(path: str) -> str | None:
    try:
        with open(path) as setting:
            return setting.read().strip()
    except OSError:
        return None


def sharing() -> str:
    """One line: the host's SMT and KSM state."""
    smt = _read(SMT_CONTROL)
    smt_text = {
        "on": "on: sibling threads share cores",
        "off": "off",
        "forceoff": "off",
        "notsupported": "not supported (off)",
        "notimplemented": "unknown (no SMT control)",
    }.get(smt or "", "unknown")
    ksm = KSM_STATES.get(_read(KSM_RUN) or "", "not built in (off)")
    return f"SMT {smt_text}; KSM {ksm}"
