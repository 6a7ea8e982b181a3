"""The structured-output manager with a stand-in backend: compiles run off the caller's thread, once per spec
(failures are not cached), a slow compile is refused after the timeout and is reusable once done, and step
bitmasks are filled on the mask thread with unconstrained rows left all-ones."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from tokenloom.config import StructuredOutputConfig
from tokenloom.sampling_params import StructuredOutputsParams
from tokenloom.structured_output import CompiledGrammar, GrammarMatcher, StructuredOutputBackend, StructuredOutputError
from tokenloom.structured_output.manager import StructuredOutputManager


class _Matcher(GrammarMatcher):
    def __init__(self, allowed: int):
        self.allowed = allowed

    def accept_tokens(self, token_ids):
        return True

    def validate_tokens(self, token_ids):
        return len(token_ids)

    def rollback(self, num_tokens):
        pass

    def is_terminated(self):
        return False

    def error(self):
        return None


class _Grammar(CompiledGrammar):
    def __init__(self, allowed):
        self.allowed = allowed

    def matcher(self):
        return _Matcher(self.allowed)


class _Backend(StructuredOutputBackend):
    """Regex "slow" takes 0.5 s, "bad" fails; a matcher allows only token `allowed` (its pattern's length)."""

    def __init__(self):
        self.compiles = []
        self.threads = set()

    def compile(self, spec):
        self.compiles.append(spec.value)
        self.threads.add(threading.current_thread().name)
        if spec.value == "slow":
            time.sleep(0.5)
        if spec.value == "bad":
            raise StructuredOutputError("bad pattern")
        return _Grammar(len(spec.value))

    def fill_bitmask(self, bitmask, rows):
        self.threads.add(threading.current_thread().name)
        for m, row, drafts in rows:
            for r in range(row, row + 1 + len(drafts)):
                bitmask[r] = 0
                bitmask[r, 0] = 1 << m.allowed


@pytest.fixture()
def manager(monkeypatch):
    backend = _Backend()
    mgr = StructuredOutputManager(None, 64, [0], StructuredOutputConfig(compile_timeout_s=0.1))
    monkeypatch.setattr(mgr, "_make_backend", lambda: backend)
    yield mgr, backend
    mgr.shutdown()


def test_compiles_once_per_spec_off_the_callers_thread(manager):
    mgr, backend = manager
    a = mgr.grammar(StructuredOutputsParams(regex="ab"))
    b = mgr.grammar(StructuredOutputsParams(regex="ab"))
    assert a is b and backend.compiles == ["ab"] and mgr.num_compiles == 1
    assert threading.current_thread().name not in backend.threads


def test_bad_and_slow_constraints(manager):
    mgr, backend = manager
    for _ in range(2):  # a failed compile is not cached: asked again, it runs again
        with pytest.raises(StructuredOutputError, match="bad pattern"):
            mgr.grammar(StructuredOutputsParams(regex="bad"))
    assert backend.compiles == ["bad", "bad"]
    with pytest.raises(StructuredOutputError, match="longer than 0.1 s"):
        mgr.grammar(StructuredOutputsParams(regex="slow"))
    time.sleep(0.6)
    assert mgr.grammar(StructuredOutputsParams(regex="slow")).allowed == 4  # finished meanwhile: reused
    assert backend.compiles.count("slow") == 1


def test_step_bitmask_filled_on_the_mask_thread(manager):
    mgr, backend = manager
    m3, m5 = (mgr.matcher(StructuredOutputsParams(regex=r)) for r in ("abc", "abcde"))
    job = mgr.start_bitmask(5, [(m3, 0, [7, 8]), (m5, 4, [])])
    mask = job.result()
    assert mask.shape == (5, 2) and mask.dtype == torch.int32
    assert [int(mask[r, 0]) for r in (0, 1, 2, 4)] == [8, 8, 8, 32]
    assert mask[3].tolist() == [-1, -1]  # no matcher here: every token allowed
    assert any(name.startswith("tokenloom-mask") for name in backend.threads)
    assert mgr.num_mask_steps == 1 and mgr.mask_seconds > 0
