"""scripts/sync_audit.py counts the calls that would make a GPU step wait, by source line."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from sync_audit import SyncAudit  # noqa: E402


def test_cpu_audit_counts_host_reads_and_value_sized_ops_only():
    x = torch.arange(6.0)
    with SyncAudit("cpu") as audit:
        y = x * 2 + 1  # stays on the device: not counted
        y.sum().item()  # a read-back
        torch.nonzero(y > 3)  # output sized by values
        y[y > 3]  # boolean indexing, likewise
        y.to("cpu")  # a copy to the host
    assert sum(audit.hits.values()) == 4, audit.hits
    assert {site.split()[0] for site in audit.hits} == {"item", "nonzero", "__getitem__", "to"}
    assert "4.0 in all" in audit.table(1)
