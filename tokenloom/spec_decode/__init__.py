"""Speculative decoding: proposers guess the next tokens, the target model verifies them in one pass.

One proposer per file (n-gram prompt lookup, draft model, self-speculation, ...), each implementing Proposer.
The engine asks the proposer for drafts after each step and puts them on the requests (`Request.spec_token_ids`);
the scheduler schedules them with the next token and reserves lookahead KV slots; the model runner verifies them
(see worker/model_runner.py) and the scheduler's update_from_output keeps the accepted ones and rolls back the rest.
"""
from tokenloom.spec_decode.proposer import Proposer

__all__ = ["Proposer"]
