"""How much of the default model's open-ended chat a proposer can guess, and so the most speculative decoding can
gain on it at batch 1 (issue 12 asks for 1.3x with the best method).

The model answers held-out chat prompts (`bench spec`'s) greedily; at every position of each answer, a proposer
drafts up to K tokens and the run counts how many the model would accept (P(accepted >= depth)). Proposers:
  ngram        prompt lookup in the request's own tokens (spec_decode/ngram.py, as served);
  ngram+table  and, where it finds nothing, the most frequent continuation of the last 1-3 tokens in the model's
               own answers to --train-prompts other instructions (a cross-request index, as suffix decoding has);
  draft_head   an EAGLE-style head trained here: the model's last hidden state at t and the embedding of token
               t+1 -> its hidden state at t+1 (one fc + one SwiGLU block), read by the model's own LM head;
               hidden states from transformers on the same GGUF, trained on the answers to --train-prompts.
A verify step of k drafts costs the decode stack's k+1 rows (measured here, one sequence at context 200, as a
multiple of a one-row step); a draft of the head costs its forward (measured, as a multiple of a one-row step).
Two speedups per proposer: the best fixed k (max over k of expected tokens per step / cost per step), and an
oracle's, which drafts at every step exactly as many tokens as the model will accept: a ceiling for any policy of
k (the adaptive one served reaches between the two), drafts of the head paid for at their measured cost (full
vocabulary, float32) and, as a bound for a cheaper head, free.

  python benchmarks/spec_open_chat.py [--train-prompts 600] [--epochs 3] [--json]   (about 10 minutes, 2 cores)
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections import Counter, defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom import LLM, SamplingParams
from tokenloom.bench.spec import CHAT
from tokenloom.loader.sources import DEFAULT_MODEL, resolve_model
from tokenloom.spec_decode.ngram import NgramProposer
from tokenloom.spec_decode.proposer import common_prefix

K = 6
TOPICS = ["the ocean", "a city at night", "friendship", "climate change", "the history of Rome", "volcanoes", "coffee",
          "learning to cook", "space travel", "the human brain", "gardening", "a rainy day", "electric cars",
          "the moon", "healthy sleep", "ancient Egypt", "machine learning", "birds", "a job interview",
          "saving money", "mountains", "the internet", "music", "chess", "a small village", "photosynthesis",
          "recycling", "the stock market", "dogs", "a lost key", "winter", "public speaking", "the printing press",
          "bees", "solar power", "time management", "a haunted house", "the Renaissance", "rivers", "teamwork",
          "a birthday party", "vaccines", "earthquakes", "the piano", "a road trip", "meditation", "dinosaurs",
          "the water cycle", "a library", "robots", "bread baking", "the Olympics", "forests", "cryptography",
          "a first day at school", "penguins", "a marathon", "the desert", "video games", "a lighthouse"]
TEMPLATES = ["Write a short story about {}.", "Explain {} to a beginner.",
             "What are the most interesting facts about {}?",
             "Give me five tips related to {}.", "Describe {} in detail.", "Write a poem about {}.",
             "Why is {} important?", "Tell me about {} in a few paragraphs.",
             "Write a blog post introduction about {}.", "What should a child know about {}?"]


def answers(llm, messages: list[str], max_tokens: int) -> list[tuple[list[int], list[int]]]:
    prompts = [llm.chat_prompt_ids([{"role": "user", "content": m}]) for m in messages]
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0))
    return [(p, list(o.outputs[0].token_ids)) for p, o in zip(prompts, outs)]


def row_costs(llm, max_rows: int) -> tuple[list[float], float]:
    """A step of r rows (one sequence, context 200, every row's logits) over a one-row step, r = 1..max_rows; and
    the one-row step's seconds."""
    fused = llm.engine.executor.runner.fused
    if fused is None:
        raise SystemExit("spec_open_chat: no compiled decode stack on this machine (it prices the verify rows)")
    table = list(range(64))
    times = {}
    for _ in range(3):
        for r in range(1, max_rows + 1):
            pos, ids = torch.arange(200, 200 + r), torch.randint(100, 1000, (r,))
            ts = []
            for _ in range(15):
                start = time.perf_counter()
                fused.token_logits(ids, pos, [table], [r])
                ts.append(time.perf_counter() - start)
            times.setdefault(r, []).append(statistics.median(ts))
    return [min(times[r]) / min(times[1]) for r in range(1, max_rows + 1)], min(times[1])


def accepted_runs(sequences, draft) -> list[list[int]]:
    """Per answer, per position t: how many of the drafts made after token t (draft(context, k) -> tokens) the
    model's greedy answer accepts."""
    runs = []
    for prompt, out in sequences:
        run = []
        for t in range(len(out) - 1):
            guess = draft(prompt + out[: t + 1], min(K, len(out) - t - 1))
            run.append(common_prefix(guess, out[t + 1 :]))
        runs.append(run)
    return runs


def depth_rates(runs: list[list[int]]) -> list[float]:
    """P(accepted >= d), d = 1..K, over every position."""
    counts = [n for run in runs for n in run]
    return [sum(n >= d for n in counts) / len(counts) for d in range(1, K + 1)]


def oracle_speedup(runs: list[list[int]], rows: list[float], draft_cost: float) -> float:
    """Decoding each answer with, at every step, exactly the drafts the model accepts (k known in advance): no
    policy of k does better, since a row costs less than the token it brings."""
    tokens = cost = 0.0
    for run in runs:
        t = 0
        while t < len(run):
            a = run[t]
            tokens, cost, t = tokens + a + 1, cost + rows[a] + a * draft_cost, t + a + 1
    return tokens / cost


def table_proposer(train):
    counts = [defaultdict(Counter) for _ in range(4)]
    for prompt, out in train:
        seq = prompt[-3:] + out
        for i in range(3, len(seq)):
            for n in range(1, 4):
                counts[n][tuple(seq[i - n : i])][seq[i]] += 1
    best = [{key: c.most_common(1)[0] for key, c in table.items()} for table in counts]

    def next_token(context):
        for n in (3, 2, 1):
            hit = best[n].get(tuple(context[-n:]))
            if hit and hit[1] >= 2:
                return hit[0]
        return None

    return next_token


class DraftHead(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.norm_in, self.norm_out = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.gate, self.up = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, feature, embedding):
        h = self.fc(torch.cat([feature, embedding], -1))
        x = self.norm_in(h)
        return self.norm_out(h + self.down(F.silu(self.gate(x)) * self.up(x)))


def features(hf, sequences):
    """Per answer: the final-normed hidden states from the prompt's last token on, and those tokens."""
    out = []
    with torch.inference_mode():
        for prompt, ans in sequences:
            h = hf.model(torch.tensor([prompt + ans])).last_hidden_state[0]
            out.append((h[len(prompt) - 1 :].clone(), torch.tensor((prompt + ans)[len(prompt) - 1 :])))
    return out


def train_head(train_feats, head_weight, epochs: float, batch: int = 512) -> DraftHead:
    feats = torch.cat([f for f, _ in train_feats])
    toks = torch.cat([x for _, x in train_feats])
    starts, offset = [], 0
    for f, _ in train_feats:
        starts += range(offset, offset + len(f) - 2)
        offset += len(f)
    index = torch.tensor(starts)
    torch.manual_seed(0)
    head = DraftHead(feats.shape[1], 1536)
    steps = int(epochs * len(index) / batch)
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    for _ in range(steps):
        b = index[torch.randint(len(index), (batch,))]
        noisy = feats[b] + (torch.rand_like(feats[b]) - 0.5) * 0.2  # EAGLE's feature noise
        predicted = head(noisy, head_weight[toks[b + 1]])
        with torch.no_grad():
            target = F.softmax(feats[b + 1] @ head_weight.T, -1)
        loss = F.cross_entropy(predicted @ head_weight.T, target) + F.smooth_l1_loss(predicted, feats[b + 1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return head.eval()


def head_runs(head, head_weight, eval_feats) -> list[list[int]]:
    """accepted_runs() of the draft head: from the model's feature at t and its token t + 1, chained."""
    runs = []
    with torch.inference_mode():
        for feats, toks in eval_feats:
            run = []
            for t in range(1, len(feats) - 1):  # t = 0: the prompt's last token (its answer's first is not drafted)
                f, tok, n = feats[t : t + 1], toks[t + 1 : t + 2], 0
                while n < K and t + 2 + n < len(toks):
                    f = head(f, head_weight[tok])
                    tok = (f @ head_weight.T).argmax(-1)
                    if tok.item() != toks[t + 2 + n].item():
                        break
                    n += 1
                run.append(n)
            runs.append(run)
    return runs


def head_step_seconds(head, head_weight) -> float:
    f, tok = torch.randn(1, head_weight.shape[1]), torch.tensor([100])
    with torch.inference_mode():
        for _ in range(10):
            head(f, head_weight[tok])
        start = time.perf_counter()
        for _ in range(100):
            (head(f, head_weight[tok]) @ head_weight.T).argmax(-1)
    return (time.perf_counter() - start) / 100


def best_speedup(rates: list[float], rows: list[float], draft_cost: float) -> tuple[float, int]:
    options = [((1 + sum(rates[:k])) / (rows[k] + k * draft_cost), k) for k in range(0, K + 1)]
    return max(options)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-prompts", type=int, default=600)
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    gguf = resolve_model(DEFAULT_MODEL).path
    llm = LLM(str(gguf))
    rows, step_seconds = row_costs(llm, K + 1)  # first: its rows write K/V into free blocks, nothing cached yet
    instructions = [t.format(x) for t in TEMPLATES for x in TOPICS]
    random.Random(0).shuffle(instructions)
    train = answers(llm, instructions[: args.train_prompts], args.max_tokens)
    held_out = answers(llm, CHAT, 128)
    ngram = NgramProposer(K)

    def ngram_draft(ctx, k):
        ngram.remove_requests(["x"])  # a fresh index: each context is new
        return ngram.lookup("x", ctx, k)[1]

    next_token = table_proposer(train)

    def combined(ctx, k):
        guess = ngram_draft(ctx, k)
        if guess:
            return guess
        while len(guess) < k and (t := next_token(ctx + guess)) is not None:
            guess.append(t)
        return guess

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    head_weight = hf.lm_head.weight.detach().float()
    head = train_head(features(hf, train), head_weight, args.epochs)
    head_cost = head_step_seconds(head, head_weight) / step_seconds
    results = {}
    for name, runs, cost in (("ngram", accepted_runs(held_out, ngram_draft), 0.0),
                             ("ngram+table", accepted_runs(held_out, combined), 0.0),
                             ("draft_head", head_runs(head, head_weight, features(hf, held_out)), head_cost)):
        rates = depth_rates(runs)
        speedup, k = best_speedup(rates, rows, cost)
        results[name] = {"accepted_at_least": rates, "draft_cost": cost, "fixed_k_speedup": speedup, "best_k": k,
                         "oracle_speedup": oracle_speedup(runs, rows, cost),
                         "oracle_free_drafts_speedup": oracle_speedup(runs, rows, 0.0)}
    report = {"row_cost": rows, "one_row_step_s": step_seconds, "train_answers": len(train),
              "train_tokens": sum(len(o) for _, o in train), "proposers": results}
    if args.json:
        print(json.dumps(report))
        return
    print(f"verify cost of k+1 rows (x one row): {' '.join(f'{r:.2f}' for r in rows)}")
    print(f"trained on {report['train_tokens']} tokens of {len(train)} answers; held out: {len(CHAT)} chat answers")
    print("proposer       P(accepted >= 1..6)                      draft cost  best fixed k  speedup  oracle"
          "  oracle, free drafts")
    for name, r in results.items():
        print(f"{name:14s} {' '.join(f'{x:.3f}' for x in r['accepted_at_least']):40s} {r['draft_cost']:9.3f}"
              f"  {r['best_k']:12d}  {r['fixed_k_speedup']:6.2f}x  {r['oracle_speedup']:6.2f}x"
              f"  {r['oracle_free_drafts_speedup']:6.2f}x")


if __name__ == "__main__":
    main()
