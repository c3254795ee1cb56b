"""tune and compare give one answer and say why (issue 17): ties go to less memory, the best plan of
every family or the reason it has none, the real reason when nothing fits, and compare searching
tune's own space with each row's partition and exchange."""
import json

import pytest

from compiler import build_spec, compile_plan, resolve_model
from compiler.cli import main
from compiler.search import Problem, Space, candidate_spec, exact_peak_memory, rank_rows, search
from passes.costs import GIB, PROFILES
from passes.simulate import simulate_timed

H100 = PROFILES["h100"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_ties_go_to_less_memory():
    rows = [{"step_s": 10.0, "peak_memory_bytes": 70, "_cand": "a"},
            {"step_s": 10.04, "peak_memory_bytes": 60, "_cand": "b"},   # 0.4% slower, less memory: first
            {"step_s": 10.2, "peak_memory_bytes": 10, "_cand": "c"}]    # 2% slower: a real difference
    assert [r["_cand"] for r in rank_rows(rows)] == ["b", "a", "c"]
    assert [r["_cand"] for r in rank_rows(rows, tie=0.0)] == ["a", "b", "c"]


def test_every_family_best_or_its_reason(capsys):
    code, out, _ = run(capsys, "tune", "--model", "tiny", "--seq-len", "256", "--gpus", "8", "--memory-budget",
                       "3MiB", "--slices", "2,4,8", "--virtual-stages", "1,2,4", "--json")
    d = json.loads(out)
    fams = {f["family"]: f for f in d["families"]}
    from compiler import schedules
    assert list(fams) == list(schedules.FAMILIES)
    for f in fams.values():
        if f["best"] is None:
            assert f["why_none"] and ("over 3.00 MiB" in f["why_none"] or "break a rule" in f["why_none"])
        else:
            assert f["best"]["peak_memory_bytes"] <= 3 * 2 ** 20 and "partition" in f["best"] and "exchange" in f["best"]
    assert d["proven"] is True and d["tie_tolerance"] == 0.005
    # the pick is the best of its family
    pick = d["top"][0]
    assert fams[pick["schedule"]]["best"]["step_s"] == pick["step_s"]
    # the text says the same, one line per family
    code, out, _ = run(capsys, "tune", "--model", "tiny", "--seq-len", "256", "--gpus", "8", "--memory-budget",
                       "3MiB", "--slices", "2,4,8", "--virtual-stages", "1,2,4")
    assert code == 0 and "best plan of each family" in out and "proven:" in out
    for name, f in fams.items():
        line = next(x for x in out.splitlines() if x.strip().startswith(name + " "))
        assert ("none: " in line) == (f["best"] is None), line


@pytest.mark.parametrize("flags,needle", [
    (["--gpus", "64", "--pp", "3"], "p=3 does not divide gpus/(tp*cp)"),
    (["--gpus", "60", "--pp", "1,2,4"], "global batch not divisible by dp"),
])
def test_real_reason_when_nothing_fits(flags, needle, capsys):
    code, out, _ = run(capsys, "tune", "--model", "tiny", "--memory-budget", "80GiB", *flags)
    assert code == 1
    assert "no plan fits" in out and "break a rule" in out and needle in out, out
    assert "need more than the budget" not in out  # memory is not the cause
    code, out, _ = run(capsys, "tune", "--model", "tiny", "--memory-budget", "80GiB", "--json", *flags)
    d = json.loads(out)
    assert code == 1 and needle in d["why_none"]


def test_least_memory_hint_is_the_memory_model_figure(capsys):
    prob = Problem(resolve_model("tiny"), 256, 8, 1.0 * 2 ** 20, 8, H100)
    res = search(prob, Space(slices=(2, 4), virtual_stages=(1, 2)), keep_plan=False)
    assert not res.top
    lm = res.least_memory
    from compiler.search import Candidate
    c = Candidate(**{k: lm[k] for k in Candidate.__dataclass_fields__})
    assert exact_peak_memory(candidate_spec(prob, c)) == lm["peak_memory_bytes"] > 2 ** 20
    assert f"{lm['peak_memory_bytes'] / 2 ** 20:.2f} MiB" in res.why_none()


OLD = ("gpipe", "1f1b", "interleaved-1f1b", "looped-bfs", "seq1f1b", "slimpipe")


def test_compare_searches_tunes_space_and_rows_reproduce(tmp_path, capsys):
    args = ["--model", "llama-7b", "--seq-len", "32768", "--memory-budget", "80GiB"]
    fams = ["--schedules", ",".join(OLD)]  # the zero-bubble families take minutes here: not in this test
    code, out, _ = run(capsys, "compare", *args, "--pp", "4", *fams, "--json")
    rows = {r["schedule"]: r for r in json.loads(out)["rows"]}
    assert code == 0 and all("partition" in r and "exchange" in r for r in rows.values()) and list(rows) == list(OLD)
    # the same layout through tune: the same best plan per family
    code, out, _ = run(capsys, "tune", *args, "--gpus", "4", "--pp", "4", "--tp", "1", "--cp", "1",
                       "--global-batch", "4", *fams, "--json")
    tuned = {f["family"]: f["best"] for f in json.loads(out)["families"]}
    for fam, r in rows.items():
        if not r["oom"]:
            assert tuned[fam] is not None and tuned[fam]["step_s"] == r["step_s"], fam
            assert {k: tuned[fam][k] for k in ("slices", "virtual_stages", "partition", "exchange")} == \
                   {k: r[k] for k in ("slices", "virtual_stages", "partition", "exchange")}
    # a compare row is reproduced by compile with the row's own settings, then simulate
    r = rows["seq1f1b"]
    plan = str(tmp_path / "p.json")
    flags = ["compile", "--schedule", "seq1f1b", "--pp", "4", "--microbatches", "4", "--slices", str(r["slices"]),
             "--virtual-stages", str(r["virtual_stages"]), "--partition", r["partition"],
             "--exchange" if r["exchange"] else "--no-exchange", *args[:4], "-o", plan]
    assert run(capsys, *flags)[0] == 0
    code, out, _ = run(capsys, "simulate", plan, "--json")
    assert json.loads(out)["step_s"] == pytest.approx(r["step_s"], rel=1e-9)
    # the text table names partition and exchange on every row
    code, out, _ = run(capsys, "compare", *args, "--pp", "4", "--schedules", "seq1f1b")
    head = next(x for x in out.splitlines() if "schedule" in x)
    assert "partition" in head and "exch" in head


def test_compare_names_unknown_families_and_an_unproven_search(capsys):
    code, out, err = run(capsys, "compare", "--pp", "2", "--schedules", "1f1b,zb-w")
    assert code == 2 and "--schedules '1f1b,zb-w': 'zb-w' is unknown; allowed: gpipe, 1f1b" in err
    code, out, _ = run(capsys, "compare", "--pp", "2", "--schedules", "seq1f1b,zb-v", "--time-limit", "1e-9", "--json")
    d = json.loads(out)
    # nothing listed, so no plan fits: exit 1, as tune
    assert code == 1 and d["proven"] is False and [r["schedule"] for r in d["rows"]] == ["seq1f1b", "zb-v"]
    code, out, _ = run(capsys, "compare", "--pp", "2", "--schedules", "seq1f1b", "--time-limit", "1e-9")
    assert "NOT PROVEN: the search stopped at --time-limit 1e-09 s" in out
    # a family whose search the limit stopped before one plan fitted is not called OOM (a new user
    # dropped zb-v on such a row, which fits once the search finishes); finished, the row is OOM
    args = ["compare", "--model", "llama-7b", "--layers", "8", "--seq-len", "32768", "--pp", "4", "--memory-budget",
            "20GiB", "--schedules", "zb-h1,slimpipe"]
    code, out, _ = run(capsys, *args, "--time-limit", "1e-9")
    line = next(x for x in out.splitlines() if x.strip().startswith("zb-h1 "))
    # (a limit this short stops it while it lists the space: the family was not reached)
    assert "none: not reached: the time limit stopped the listing of the space" in line and "OOM" not in line, line
    code, out, _ = run(capsys, *args, "--time-limit", "0")
    line = next(x for x in out.splitlines() if x.strip().startswith("zb-h1 "))
    assert "OOM: its least-memory plan; all 6 that obey the rules are over budget" in line, line  # n = 1 and the five n of the space


def test_a_search_stopped_by_the_time_limit_says_not_proven(capsys):
    code, out, _ = run(capsys, "tune", "--model", "tiny", "--seq-len", "256", "--gpus", "8", "--memory-budget",
                       "3MiB", "--slices", "2,4", "--virtual-stages", "1,2", "--time-limit", "1e-9", "--json")
    d = json.loads(out)
    # a limit this short stops the search while it lists the space (the listing is timed too)
    assert d["proven"] is False and d["stopped"] == "time-limit" and d["listing_cut"] is True
    assert sum(v for k, v in d["counts"].items() if k != "candidates") == d["counts"]["candidates"]
    code, out, _ = run(capsys, "tune", "--model", "tiny", "--seq-len", "256", "--gpus", "8", "--memory-budget",
                       "3MiB", "--slices", "2,4", "--virtual-stages", "1,2", "--time-limit", "1e-9")
    assert "no plan found: the time limit stopped the search before it listed a candidate" in out
    assert "NOT PROVEN: the search stopped at --time-limit 1e-09 s with 0 candidates unexplored and the space listed " \
           "only up to candidate 0" in out


def test_a_limit_that_comes_after_the_listing_leaves_candidates_unexplored(capsys, monkeypatch):
    """The space listed whole, the limit then stops the branch and bound: its candidates left
    are counted unexplored (those whose bound could still beat the answer) or provably slower."""
    import compiler.search as S

    listed = S._Run.stage1

    def stage1_then_out_of_time(self):
        listed(self)
        self.deadline = 0.0  # the limit comes right after the listing

    monkeypatch.setattr(S._Run, "stage1", stage1_then_out_of_time)
    args = ["tune", "--model", "tiny", "--seq-len", "256", "--gpus", "8", "--memory-budget", "3MiB", "--slices", "2,4",
            "--virtual-stages", "1,2", "--time-limit", "0"]
    code, out, _ = run(capsys, *args, "--json")
    d = json.loads(out)
    assert d["proven"] is False and d["stopped"] == "time-limit" and d["listing_cut"] is False
    assert d["counts"]["unexplored"] > 0 and d["counts"]["simulated"] == 0
    assert sum(v for k, v in d["counts"].items() if k != "candidates") == d["counts"]["candidates"]
    code, out, _ = run(capsys, *args)
    assert "NOT PROVEN" in out and "unexplored (time limit)" in out and "provably slower" in out


def test_no_virtual_stages_on_one_rank(capsys):
    """At p = 1 every chunk sits on the one rank: v > 1 is the same units cut finer, so tune does not
    offer it (its 8B answer once read 'p=1 ... v=8')."""
    code, out, _ = run(capsys, "tune", "--model", "tiny", "--gpus", "2", "--pp", "1", "--tp", "1,2", "--cp", "1",
                       "--slices", "2", "--virtual-stages", "1,2,4", "--memory-budget", "80GiB", "--json")
    d = json.loads(out)
    assert code == 0 and d["top"] and all(r["pp"] == 1 and r["virtual_stages"] == 1 for r in d["top"])
    assert list(d["infeasible_reasons"]) == ["v > 1 at p = 1 (one rank holds every chunk, nothing to interleave)"]


def test_compare_with_no_plan_that_fits_exits_1(capsys):
    """Every family breaks a rule at p=16 with the tiny model's 8 layers: the table says why per
    family, a last line says no plan fits, exit 1 (it was exit 0 with every row 'none')."""
    code, out, _ = run(capsys, "compare", "--pp", "16")
    assert code == 1 and "1f1b             none: 1 of 1 break a rule (p*v exceeds the model's layers: 1)" in out
    assert out.rstrip().endswith("no plan fits at this layout: no family has one that obeys its rules and fits the "
                                 "budget (the rows say why)")
    code, out, _ = run(capsys, "compare", "--pp", "16", "--json")
    assert code == 1 and all(r["oom"] for r in json.loads(out)["rows"])


def test_the_limit_stops_a_candidate_that_takes_long(capsys, monkeypatch):
    """A candidate whose compilation takes longer than what is left of the limit is left at the
    limit (SIGALRM), not finished: before, an interleaved zero-bubble candidate of 70B at 512K held
    a 3 s limit to 10 s."""
    import time

    import compiler.search as S

    import signal

    finished = []
    before = signal.getsignal(signal.SIGALRM)

    def slow(self, c):
        time.sleep(20)
        finished.append(c)
        return ("rule", "never")

    monkeypatch.setattr(S._Run, "evaluate", slow)
    code, out, _ = run(capsys, "tune", "--model", "tiny", "--seq-len", "256", "--gpus", "2", "--memory-budget", "80GiB",
                       "--time-limit", "0.5", "--json")
    d = json.loads(out)
    assert finished == [] and d["stopped"] == "time-limit" and d["listing_cut"] is False
    assert d["counts"]["unexplored"] > 0 and d["counts"]["simulated"] == 0
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # put back


def test_candidates_beyond_the_unit_limit_break_a_rule(capsys):
    """A global batch that makes m huge: its candidates are refused by the units rule before any
    bound is made (the interleaved bound built a list of m/p rounds: 8.4 GB, 45 s past a 5 s limit)."""
    code, out, _ = run(capsys, "tune", "--model", "tiny", "--seq-len", "128", "--gpus", "4", "--memory-budget", "80GiB",
                       "--global-batch", "2147483647", "--json")
    d = json.loads(out)
    assert code == 1 and d["counts"]["infeasible"] == d["counts"]["candidates"] > 0
    assert any("more compute units (p x m x n x v) than slimpipe plans" in why for why in d["infeasible_reasons"])


def test_nothing_found_before_the_limit_is_not_called_a_verdict(capsys):
    code, out, _ = run(capsys, "compare", "--pp", "2", "--schedules", "seq1f1b", "--time-limit", "1e-9")
    assert code == 1 and out.rstrip().endswith("no plan found before the time limit at this layout (the rows say how "
                                               "far each family got)")
