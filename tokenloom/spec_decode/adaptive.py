"""Adaptive k: how many drafts each request verifies next step, chosen to maximise tokens per second.

Each request keeps an estimate of alpha, the chance that a draft is accepted given the drafts before it were
(decayed counts, so it follows a conversation's changing phases), per kind of proposal (an n-gram lookup's match
length); a new request starts from the engine-wide estimate of the same kind. The step's cost is measured, not
assumed: the runner reports each decode step's wall time with the number of token rows it ran, and StepCost fits
a line to them. Drafts are then added in order of expected gain (the j-th draft of a request is kept with
probability alpha^j) for as long as expected tokens per unit of cost improve, across the whole batch; where no
draft pays, a request verifies none (speculation pauses). A cheap proposer's drafts are still scored against the
tokens that came, so speculation resumes when they would pay again; a costly one is probed now and then (one
request at a time, less often while probes fail).
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

DECAY = 0.9  # weight of past observations per verify step
GLOBAL_DECAY = 0.98  # the same for the engine-wide estimate new requests start from
PRIOR_WEIGHT = 2.0  # observations a new request's starting estimate counts as (alpha starts at 1/2)
PROBE_FIRST, PROBE_MAX = 32, 1024  # paused steps before a costly proposer's probe; doubled after each failed one
PROBE_DRAFTS = 2  # drafts a probe verifies
ROW_COST_GUESS = 0.35  # cost of one more row relative to a one-row step, until measured
REMEASURE_EVERY = 64  # plans without drafts before one likely draft is verified anyway (fresh cost figures)


@dataclass
class Acceptance:
    accepted: float = PRIOR_WEIGHT / 2
    rejected: float = PRIOR_WEIGHT / 2

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def observe(self, num_drafts: int, num_accepted: int, decay: float = DECAY) -> None:
        """A run of num_drafts drafts of which the first num_accepted were accepted (a rejection ends a run;
        drafts cut short by the end of the tokens compared count only as far as they went)."""
        if num_drafts <= 0:
            return
        self.accepted = self.accepted * decay + num_accepted
        self.rejected = self.rejected * decay + (1.0 if num_accepted < num_drafts else 0.0)


class StepCost:
    """Wall time of a step by the number of token rows it ran (decodes plus drafts), as a line a + b * rows
    fitted to the median time of each row count seen (a noisy machine's outliers do not move a median; the line
    prices row counts not seen yet). Before two row counts are seen, a row is guessed at ROW_COST_GUESS of a
    one-row step."""

    WINDOW = 15

    def __init__(self):
        self.samples: dict[int, deque] = {}
        self.mean: dict[int, float] = {}
        self._line: tuple[float, float] | None = None

    def observe(self, rows: int, seconds: float) -> None:
        window = self.samples.setdefault(rows, deque(maxlen=self.WINDOW))
        window.append(seconds)
        self.mean[rows] = statistics.median(window)
        self._line = None

    def line(self) -> tuple[float, float]:
        """(a, b): a step of r rows costs a + b r."""
        if self._line is None:
            pts = [(r, m, len(self.samples[r])) for r, m in self.mean.items()]
            if len(pts) >= 2:
                w = sum(n for _, _, n in pts)
                mr = sum(r * n for r, _, n in pts) / w
                mc = sum(c * n for _, c, n in pts) / w
                var = sum(n * (r - mr) ** 2 for r, _, n in pts)
                b = sum(n * (r - mr) * (c - mc) for r, c, n in pts) / var
                # More rows never cost less, and one more row never costs more than a one-row step (which reads
                # every weight besides): a few outliers (a first touch of memory, a noisy neighbour) must not
                # price drafts out for good.
                one = min(m for _, m, _ in pts)
                b = min(max(b, 0.05 * mc / mr), one)
                self._line = (mc - b * mr, b)
            else:
                r0, c0 = (pts[0][0], pts[0][1]) if pts else (1, 1.0)
                b = c0 * ROW_COST_GUESS / (1 + ROW_COST_GUESS * (r0 - 1))
                self._line = (c0 - b * r0, b)
        return self._line

    def __call__(self, rows: int) -> float:
        a, b = self.line()
        return a + b * rows


class AdaptiveK:
    def __init__(self, max_k: int, enabled: bool = True, cheap: bool = True):
        self.max_k, self.enabled, self.cheap = max_k, enabled, cheap
        self.stats: dict[tuple, Acceptance] = {}  # (request id, kind of proposal) -> its acceptance
        self.engine_wide: dict[int, Acceptance] = {}  # kind -> acceptance over every request: new ones start here
        self.cost = StepCost()
        self.paused_steps, self.probe_after = 0, PROBE_FIRST  # a costly proposer's probes, engine-wide
        self.steps_without_drafts = 0  # plans in a row that verified nothing (the cost line goes stale)

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

    def plan(self, keys: list, available: list[int], draft_step_cost: float = 0.0) -> list[int]:
        """Drafts to verify per request, given how many each could have (its proposal's length). keys: each
        request's acceptance statistics (a request id, or a request id with the kind of its proposal). Each draft
        step of a model proposer costs draft_step_cost (in the step-cost's units) for the whole batch."""
        if not self.enabled:
            return [min(a, self.max_k) for a in available]
        B = len(keys)
        gains = []  # (expected extra tokens, request index), best first within each request by construction
        for i, (key, avail) in enumerate(zip(keys, available)):
            alpha = self.acceptance(key).alpha
            g = 1.0
            for j in range(min(avail, self.max_k)):
                g *= alpha
                gains.append((g, j, i))
        gains.sort(key=lambda t: -t[0])
        ks = [0] * B
        tokens, best_rate, best_n = float(B), B / self.cost(B), 0
        depth = 0
        for n, (g, j, i) in enumerate(gains, 1):
            tokens += g
            depth = max(depth, j + 1)
            rate = tokens / (self.cost(B + n) + draft_step_cost * depth)
            if rate > best_rate:
                best_rate, best_n = rate, n
        for g, j, i in gains[:best_n]:
            ks[i] += 1
        if any(ks) or not gains:
            self.steps_without_drafts = 0
        else:  # now and then verify the likeliest draft anyway, so the cost of rows is measured afresh
            self.steps_without_drafts += 1
            g, j, i = gains[0]
            if self.steps_without_drafts >= REMEASURE_EVERY and g >= 0.5:
                self.steps_without_drafts = 0
                ks[i] = 1
        return ks

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

    def remove_requests(self, request_ids) -> None:
        gone = set(request_ids)
        for key in [key for key in self.stats if key[0] in gone]:
            del self.stats[key]
