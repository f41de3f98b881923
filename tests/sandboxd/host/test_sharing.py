"""What status says the host lets VMs share (SMT, KSM), from the host's own settings."""

from __future__ import annotations

import pytest

from sandboxd.host import sharing


@pytest.mark.parametrize(
    ("smt", "ksm", "said"),
    [
        ("on", "1", "SMT on: sibling threads share cores; KSM on: equal pages are merged"),
        ("forceoff", "0", "SMT off; KSM off"),
        ("notsupported", None, "SMT not supported (off); KSM not built in (off)"),
    ],
)
def test_the_host_s_smt_and_ksm_settings_are_said_as_they_are(
    tmp_path, monkeypatch, smt, ksm, said
):
    (tmp_path / "smt").write_text(f"{smt}\n")
    monkeypatch.setattr(sharing, "SMT_CONTROL", str(tmp_path / "smt"))
    if ksm is not None:
        (tmp_path / "ksm").write_text(f"{ksm}\n")
    monkeypatch.setattr(sharing, "KSM_RUN", str(tmp_path / "ksm"))
    assert sharing.sharing().startswith(said)
