"""compare: one best row per family, OOM marking, and flag validation."""
import json

import pytest

from compiler import schedules
from compiler.cli import main
from compiler.cli.cmd_compare import parse_bytes
from ir import SpecError


def test_compare_json(capsys):
    # llama-7b's layer shape cut to 8 layers: every family's search takes seconds (at 32 layers the
    # zero-bubble families' take minutes), and the 20 GiB budget leaves some families OOM
    assert main(["compare", "--model", "llama-7b", "--layers", "8", "--seq-len", "32768", "--pp", "4",
                 "--memory-budget", "20GiB", "--time-limit", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["schedule"]: r for r in out["rows"]}
    assert set(rows) == set(schedules.FAMILIES)  # every family's record gives compare choices
    assert out["memory_budget_bytes"] == 20 * 2 ** 30 and out["proven"] is True
    for r in rows.values():
        assert r["oom"] == (r["peak_memory_bytes"] > 20 * 2 ** 30)
    assert rows["1f1b"]["oom"] and not rows["slimpipe"]["oom"] and not rows["seq1f1b"]["oom"]
    # sequence slicing needs less memory than whole-sequence 1F1B
    assert rows["slimpipe"]["peak_memory_bytes"] < rows["1f1b"]["peak_memory_bytes"]
    assert rows["seq1f1b"]["peak_memory_bytes"] < rows["1f1b"]["peak_memory_bytes"]


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2 ** 30
    assert parse_bytes("1.5GB") == 1.5e9
    assert parse_bytes("1000B") == 1000
    for bad in ("eighty", "80XB", "-5GiB", "0", "0GiB", "80"):
        with pytest.raises(SpecError):
            parse_bytes(bad)


@pytest.mark.parametrize("flags", [["--memory-budget", "lots"], ["--tp", "0"], ["--tp", "3"], ["--device-profile", "tpu"]])
def test_compare_rejects(flags, capsys):
    assert main(["compare", "--model", "llama-7b", "--seq-len", "8192", "--pp", "2"] + flags) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
