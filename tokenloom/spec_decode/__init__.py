"""Speculative decoding: proposers guess the next tokens, the target model verifies them in one pass.

One proposer per file, each implementing Proposer (proposer.py): n-gram prompt lookup (ngram.py) and a draft model
(draft_model.py: a separate model, the target quantized, or the target's first layers). After each step the model
runner's Speculator (speculator.py) learns from the verified drafts, plans how many each request gets
(adaptive.py) and asks the proposer; the drafts reach the scheduler through the runner's output and go on the
requests (`Request.spec_token_ids`); the scheduler schedules them with the next token (reserving lookahead KV
slots), the runner verifies them (worker/model_runner.py) and update_from_output keeps the accepted ones and rolls
back the rest. worker/speculative.py builds all this from a SpeculativeConfig.
"""
from tokenloom.spec_decode.proposer import Draft, DraftRequest, Proposer

__all__ = ["Draft", "DraftRequest", "Proposer"]
