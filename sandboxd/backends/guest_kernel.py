"""What every VM's guest kernel is told on its command line, whatever runs the VM."""

from __future__ import annotations

import re
from pathlib import Path


def host_tsc_khz() -> int | None:
    """The host's TSC frequency: a guest under TCG must be told it (tsc_early_khz), or
    the Debian kernel can hang calibrating its clocks."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    match = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.MULTILINE)
    return int(float(match.group(1)) * 1000) if match else None


def kernel_cmdline(
    *, agent_port: int, emulated: bool = False, hz: int = 250, extra: str = ""
) -> str:
    """The command line: serial console, no reboot on panic, the agent's vsock port (see
    guest/init.sh); under software emulation (``emulated``) the clock hints."""
    words = ["console=ttyS0", "quiet", "panic=-1", "random.trust_cpu=on"]
    words.append(f"sandboxd.agent_port={agent_port}")
    khz = host_tsc_khz()
    if emulated and khz:
        words += [f"tsc_early_khz={khz}", f"lpj={khz * 1000 // hz}"]
    return " ".join([*words, *extra.split()])
