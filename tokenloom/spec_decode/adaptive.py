"""Adaptive k: how many drafts each request verifies next step, chosen to maximise tokens per second.

Each request keeps an estimate of alpha, the chance that a draft is accepted given the drafts before it were
(decayed counts, so it follows a conversation's changing phases), per kind of proposal (an n-gram lookup's match
length); a new request starts from the engine-wide estimate of the same kind, with short runs at first. The
step's cost is measured, not assumed: the runner reports each decode step's wall time with the number of token
rows it ran (StepCost). Drafts are then added in order of expected gain (the j-th draft of a request is kept with
probability alpha^j) for as long as expected tokens per unit of cost improve, across the whole batch; where no
draft pays, a request verifies none (speculation pauses). When no request waits for a slot, the batch runs until
its longest request is done, and drafts are planned for that instead (_makespan_plan). A cheap proposer's drafts
are still scored against the tokens that came, so speculation resumes when they would pay again (and now and then
one is verified anyway, so the cost of rows stays measured); a costly one is probed now and then (one request at
a time, less often while probes fail, and never more than PROBE_SHARE of the time: a model draft's first
proposal for a request also runs the request's whole context through the draft).
"""
from __future__ import annotations

import bisect
import statistics
from collections import deque
from dataclasses import dataclass

DECAY = 0.9  # weight of past observations per verify step
GLOBAL_DECAY = 0.98  # the same for the engine-wide estimate new requests start from
PRIOR_WEIGHT = 2.0  # observations a new request's starting estimate counts as (alpha starts at 1/2)
PROBE_FIRST, PROBE_MAX = 32, 1024  # paused steps before a costly proposer's probe; doubled after each failed one
PROBE_DRAFTS = 2  # drafts a probe verifies
PROBE_SHARE = 0.02  # of the decode time, at most, that failed probes of a costly proposer take
ROW_COST_GUESS = 0.35  # cost of one more row relative to a one-row step, until measured
FIRST_RUNS, FIRST_RUN_DRAFTS = 2, 2  # a request's first verify runs of a kind take at most this many drafts
REMEASURE_EVERY = 64  # plans without drafts before one likely draft is verified anyway (fresh cost figures)


@dataclass
class Acceptance:
    accepted: float = PRIOR_WEIGHT / 2
    rejected: float = PRIOR_WEIGHT / 2
    runs: int = 0  # verify runs observed

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def observe(self, num_drafts: int, num_accepted: int, decay: float = DECAY) -> None:
        """A run of num_drafts drafts of which the first num_accepted were accepted (a rejection ends a run;
        drafts cut short by the end of the tokens compared count only as far as they went)."""
        if num_drafts <= 0:
            return
        self.runs += 1
        self.accepted = self.accepted * decay + num_accepted
        self.rejected = self.rejected * decay + (1.0 if num_accepted < num_drafts else 0.0)


class StepCost:
    """Wall time of a step by the number of token rows it ran (decodes plus drafts): the median of the last few
    steps of each row count seen at least MIN_SAMPLES times (a noisy machine's outliers do not move a median),
    joined piecewise-linearly; other row counts extend the nearest segment. One more row is priced between 5 % and
    100 % of a one-row step (which reads every weight besides). Before two row counts are known, a row is guessed
    at ROW_COST_GUESS of a one-row step."""

    WINDOW = 15
    MIN_SAMPLES = 3

    def __init__(self):
        self.samples: dict[int, deque] = {}
        self.mean: dict[int, float] = {}
        self._curve: tuple[list[int], list[float], float, float] | None = None

    def observe(self, rows: int, seconds: float) -> None:
        window = self.samples.setdefault(rows, deque(maxlen=self.WINDOW))
        window.append(seconds)
        self.mean[rows] = statistics.median(window)
        self._curve = None

    def _build(self) -> tuple[list[int], list[float], float, float]:
        # row counts seen fewer than MIN_SAMPLES times are priced from the others: one outlier is not a price
        rows = sorted(r for r in self.mean if len(self.samples[r]) >= self.MIN_SAMPLES) or sorted(self.mean)
        if not rows:
            return [1], [1.0], ROW_COST_GUESS, ROW_COST_GUESS
        one = self.mean[rows[0]] / (1 + ROW_COST_GUESS * (rows[0] - 1))  # a one-row step, measured or guessed
        lo, hi = 0.05 * one, one
        costs = [self.mean[rows[0]]]
        for prev, r in zip(rows, rows[1:]):  # each row adds between lo and hi
            costs.append(min(max(self.mean[r], costs[-1] + lo * (r - prev)), costs[-1] + hi * (r - prev)))

        def slope(i: int) -> float:  # of the segment from point i to i + 1
            return min(max((costs[i + 1] - costs[i]) / (rows[i + 1] - rows[i]), lo), hi)

        first = slope(0) if len(rows) > 1 else ROW_COST_GUESS * one
        last = slope(len(rows) - 2) if len(rows) > 1 else ROW_COST_GUESS * one
        return rows, costs, first, last

    def __call__(self, rows: int) -> float:
        if self._curve is None:
            self._curve = self._build()
        xs, ys, first, last = self._curve
        if rows <= xs[0]:
            return ys[0] - first * (xs[0] - rows)
        if rows >= xs[-1]:
            return ys[-1] + last * (rows - xs[-1])
        i = bisect.bisect_right(xs, rows) - 1
        return ys[i] + (ys[i + 1] - ys[i]) * (rows - xs[i]) / (xs[i + 1] - xs[i])


class AdaptiveK:
    def __init__(self, max_k: int, enabled: bool = True, cheap: bool = True):
        self.max_k, self.enabled, self.cheap = max_k, enabled, cheap
        self.stats: dict[tuple, Acceptance] = {}  # (request id, kind of proposal) -> its acceptance
        self.engine_wide: dict[int, Acceptance] = {}  # kind -> acceptance over every request: new ones start here
        self.cost = StepCost()
        self.paused_steps, self.probe_after = 0, PROBE_FIRST  # a costly proposer's probes, engine-wide
        self.steps_without_drafts = 0  # plans in a row that verified nothing (the cost of rows goes stale)

    def acceptance(self, key: tuple) -> Acceptance:
        s = self.stats.get(key)
        if s is None:
            g = self.engine_wide.get(key[1])
            alpha = g.alpha if g is not None else 0.5
            s = self.stats[key] = Acceptance(PRIOR_WEIGHT * alpha, PRIOR_WEIGHT * (1 - alpha))
        return s

    def observe(self, key: tuple, num_drafts: int, num_accepted: int) -> None:
        self.acceptance(key).observe(num_drafts, num_accepted)
        g = self.engine_wide.get(key[1])
        if g is None:
            g = self.engine_wide[key[1]] = Acceptance()
        g.observe(num_drafts, num_accepted, GLOBAL_DECAY)

    def plan(self, keys: list, available: list[int], draft_step_cost: float = 0.0,
             remaining: list[int] | None = None) -> list[int]:
        """Drafts to verify per request, given how many each could have (its proposal's length). keys: each
        request's acceptance statistics, (request id, kind of proposal). Each draft step of a model proposer costs
        draft_step_cost (seconds, as the step cost) for the whole batch. remaining: each request's tokens left
        (max_tokens) when no request waits for a slot: the batch then runs until its longest request is done, so
        the plan is for that (see _makespan_plan); None: for tokens per second."""
        if not self.enabled:
            return [min(a, self.max_k) for a in available]
        limits, alphas = [], []
        for key, avail in zip(keys, available):
            stats = self.acceptance(key)
            alphas.append(stats.alpha)
            # a request's first runs of a kind stay short: the engine-wide estimate it starts from may be another
            # workload's
            limits.append(min(avail, self.max_k if stats.runs >= FIRST_RUNS else FIRST_RUN_DRAFTS))
        if remaining is not None and len(keys) > 1:
            ks = self._makespan_plan(alphas, limits, remaining, draft_step_cost)
        else:
            ks = self._throughput_plan(alphas, limits, draft_step_cost)
        likeliest = max(range(len(keys)), key=lambda i: alphas[i] if limits[i] else -1.0)
        if any(ks) or not limits[likeliest] or not self.cheap:  # (a costly proposer is probed instead)
            self.steps_without_drafts = 0
        else:  # now and then verify the likeliest draft anyway, so the cost of rows is measured afresh
            self.steps_without_drafts += 1
            if self.steps_without_drafts >= REMEASURE_EVERY and alphas[likeliest] >= 0.5:
                self.steps_without_drafts = 0
                ks[likeliest] = 1
        return ks

    def _throughput_plan(self, alphas: list[float], limits: list[int], draft_step_cost: float) -> list[int]:
        """Drafts in order of expected gain (the j-th draft of a request is kept with probability alpha^j), as
        many as raise the batch's expected tokens per second."""
        B = len(alphas)
        gains = [(alphas[i] ** (j + 1), j, i) for i in range(B) for j in range(limits[i])]
        gains.sort(key=lambda t: -t[0])
        tokens, best_rate, best_n, depth = float(B), B / self.cost(B), 0, 0
        for n, (g, j, i) in enumerate(gains, 1):
            tokens += g
            depth = max(depth, j + 1)
            rate = tokens / (self.cost(B + n) + draft_step_cost * depth)
            if rate > best_rate:
                best_rate, best_n = rate, n
        ks = [0] * B
        for g, j, i in gains[:best_n]:
            ks[i] += 1
        return ks

    def _makespan_plan(self, alphas: list[float], limits: list[int], remaining: list[int],
                       draft_step_cost: float) -> list[int]:
        """A batch that runs until its longest request is done gains from drafts only as far as they speed up
        the requests with the most left to do (here: at least half of the most): every step costs the batch's
        rows, so an early finisher's accepted drafts save rows, not steps, and its rejected ones cost rows. So
        the step's progress is the least expected tokens among those requests, and drafts go to whichever of them
        expects the fewest, for as long as progress per second rises. Nobody's tokens come slower than without
        drafts (in a batch of 8 chats, where some requests draft well and others not at all, none are verified)."""
        B = len(alphas)
        horizon = max(remaining)
        critical = [i for i in range(B) if 2 * remaining[i] >= horizon]
        ks, expect, nxt = [0] * B, [1.0] * B, list(alphas)
        best_rate, best, total, depth = 1.0 / self.cost(B), list(ks), 0, 0
        while True:
            i = min(critical, key=lambda j: (expect[j], -nxt[j]))  # the one holding the batch back
            if ks[i] >= limits[i]:
                break
            ks[i] += 1
            expect[i] += nxt[i]
            nxt[i] *= alphas[i]
            total, depth = total + 1, max(depth, ks[i])
            rate = min(expect[j] for j in critical) / (self.cost(B + total) + draft_step_cost * depth)
            if rate > best_rate:
                best_rate, best = rate, list(ks)
        return best

    def probe(self, ks: list[int], available: list[int]) -> list[int]:
        """A costly proposer's plan ks, or while it drafts for nobody, now and then a short probe of one request
        (engine-wide, so probing costs at most 1/PROBE_FIRST of the steps, less after each probe that did not
        pay: a probe that pays resumes drafting through plan())."""
        if any(ks):
            self.paused_steps, self.probe_after = 0, PROBE_FIRST
            return ks
        self.paused_steps += 1
        if self.paused_steps < self.probe_after or not any(available):
            return ks
        self.paused_steps, self.probe_after = 0, min(2 * self.probe_after, PROBE_MAX)
        i = max(range(len(ks)), key=lambda j: available[j])
        return [min(PROBE_DRAFTS, available[j]) if j == i else 0 for j in range(len(ks))]

    def probed(self, seconds: float) -> None:
        """A probe's proposal took `seconds`: the next one waits until probes stay within PROBE_SHARE of the
        decode time (at a one-row step's measured cost)."""
        self.probe_after = max(self.probe_after, int(seconds / (PROBE_SHARE * self.cost(1))))

    def remove_requests(self, request_ids) -> None:
        gone = set(request_ids)
        for key in [key for key in self.stats if key[0] in gone]:
            del self.stats[key]
