"""Test-time compute through a real server and the Python API (tokenloom.ttc): best_of, self_consistency and a
judge's scorer. Each result is checked against what the plain API returns for the same seed: the n = N
candidates with their logprobs (best_of: the highest mean token logprob), the answers a regex finds in them
(self-consistency: the majority, computed here), and the judge asked directly (scorer: its Yes probability or
its number). Plus OpenAI's validation rules, usage over every candidate, and one prefill for all candidates."""
from __future__ import annotations

import math
import re
from collections import Counter

import httpx
import pytest
from test_server import MODEL, RunningServer

from tokenloom import SamplingParams, ttc

pytestmark = pytest.mark.slow

PROMPT = "Q: Name a fruit that is red.\nA:"
SUM = "Q: What is 7 + 5?\nA: The answer is"
SEED = 11


@pytest.fixture(scope="module")
def served():
    from tokenloom import LLM
    from tokenloom.engine.async_engine import AsyncEngine
    from tokenloom.entrypoints.server import build_app

    llm = LLM(MODEL, max_model_len=2048, kv_cache_memory=256 << 20)
    aengine = AsyncEngine(llm.engine).start()
    server = RunningServer(build_app(aengine, None, api_key=None, max_queue=256))
    server.http = httpx.Client(base_url=server.url, timeout=300)
    server.engine = llm.engine
    yield server
    server.stop()
    aengine.shutdown()


def _post(served, path: str, **body) -> dict:
    r = served.http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _warm(served, path: str, **body) -> None:
    """Cache the prompt's full blocks first, so the requests compared run alike: a prompt prefilled whole and one
    partly read from the prefix cache may differ in the last float bits, and a seeded draw can follow them."""
    _post(served, path, **{**body, "n": 1, "max_tokens": 1})


def _means(resp: dict) -> list[float]:
    """Each choice's mean token logprob, from the logprobs the plain API returned."""
    out = []
    for c in resp["choices"]:
        lps = (c["logprobs"]["token_logprobs"] if "text" in c
               else [t["logprob"] for t in c["logprobs"]["content"]])
        out.append(sum(lps) / len(lps))
    return out


def _top(values: list[float], k: int) -> list[int]:
    return sorted(range(len(values)), key=lambda i: -values[i])[:k]


# ---- best_of ----------------------------------------------------------------------------------------------
def test_best_of_is_the_highest_mean_logprob_of_the_n_candidates(served):
    common = dict(prompt=PROMPT, temperature=1.0, seed=SEED, max_tokens=10)
    _warm(served, "/v1/completions", **common)
    full = _post(served, "/v1/completions", n=8, logprobs=0, **common)
    means = _means(full)
    assert len(set(c["text"] for c in full["choices"])) > 1
    best = _post(served, "/v1/completions", n=2, best_of=8, **common)
    want = _top(means, 2)
    assert [c["text"] for c in best["choices"]] == [full["choices"][i]["text"] for i in want]
    assert [c["index"] for c in best["choices"]] == [0, 1]
    assert [c["score"] for c in best["choices"]] == pytest.approx([means[i] for i in want], abs=1e-4)
    assert all(c["logprobs"] is None for c in best["choices"])
    # usage: every candidate's tokens (OpenAI's best_of), the prompt once
    assert best["usage"]["completion_tokens"] == full["usage"]["completion_tokens"] == sum(
        len(c["logprobs"]["tokens"]) for c in full["choices"])
    assert best["usage"]["prompt_tokens"] == full["usage"]["prompt_tokens"]
    # logprobs for the chosen ones, when asked
    asked = _post(served, "/v1/completions", n=1, best_of=8, logprobs=2, **common)
    (c,) = asked["choices"]
    assert c["text"] == full["choices"][want[0]]["text"]
    assert c["logprobs"]["token_logprobs"] == pytest.approx(full["choices"][want[0]]["logprobs"]["token_logprobs"],
                                                            abs=1e-4)
    assert all(len(t) >= 2 for t in c["logprobs"]["top_logprobs"])


def test_chat_best_of_through_the_openai_client(served):
    import openai

    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    msgs = [{"role": "user", "content": "Name a colour."}]
    common = dict(model=MODEL, messages=msgs, temperature=1.0, seed=SEED, max_tokens=8)
    _warm(served, "/v1/chat/completions", **common)
    full = client.chat.completions.create(n=4, logprobs=True, **common).model_dump()
    means = _means(full)
    best = client.chat.completions.create(extra_body={"best_of": 4}, **common)
    (choice,) = best.choices
    assert choice.message.content == full["choices"][_top(means, 1)[0]]["message"]["content"]
    assert choice.model_extra["score"] == pytest.approx(max(means), abs=1e-4)
    assert choice.logprobs is None
    assert best.usage.completion_tokens == full["usage"]["completion_tokens"]


def test_eight_candidates_prefill_the_prompt_once(served):
    engine = served.engine
    prompt = "A never seen prompt about looms, weaving, threads and the patterns they make: " * 3
    before = engine.stats()
    resp = _post(served, "/v1/completions", prompt=prompt, n=1, best_of=8, max_tokens=4, temperature=1.0)
    after = engine.stats()
    assert after.prompt_tokens_computed - before.prompt_tokens_computed == resp["usage"]["prompt_tokens"]
    assert after.prompt_tokens_reused == before.prompt_tokens_reused
    assert 8 <= resp["usage"]["completion_tokens"] <= 8 * 4  # every candidate's tokens


# ---- self-consistency -------------------------------------------------------------------------------------------
def _expected_vote(texts: list[str], totals: list[float], regex: str):
    """The majority answer computed here: first capture group of the first match, stripped; a tie to the answer
    whose completions' total logprob is highest."""
    answers = []
    for t in texts:
        m = re.search(regex, t)
        answers.append((m.group(1) if m.re.groups else m.group(0)).strip() or None if m else None)
    votes = Counter(a for a in answers if a is not None)
    weight = {a: sum(lp for b, lp in zip(answers, totals) if b == a) for a in votes}
    top = max(votes.values())
    winner = max((a for a in votes if votes[a] == top), key=lambda a: weight[a])
    return answers, dict(votes), winner


def test_self_consistency_returns_the_majority_answer(served):
    regex = r"(\d+)"
    _warm(served, "/v1/completions", prompt=SUM)
    resp = _post(served, "/v1/completions", prompt=SUM, temperature=1.0, seed=SEED, max_tokens=8, logprobs=0,
                 self_consistency={"answer_regex": regex, "n": 8})
    texts = [c["text"] for c in resp["choices"]]
    totals = [sum(c["logprobs"]["token_logprobs"]) for c in resp["choices"]]
    answers, votes, winner = _expected_vote(texts, totals, regex)
    assert len(votes) > 1, "the candidates should disagree for the vote to mean something"
    assert resp["answer"] == winner and resp["votes"] == votes
    assert list(resp["votes"].values()) == sorted(resp["votes"].values(), reverse=True)
    assert [c["answer"] for c in resp["choices"]] == answers
    assert [c["index"] for c in resp["choices"]] == list(range(8))
    assert resp["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in resp["choices"])
    # the same seed: the candidates are the n = 8 completions
    plain = _post(served, "/v1/completions", prompt=SUM, temperature=1.0, seed=SEED, max_tokens=8, n=8)
    assert [c["text"] for c in plain["choices"]] == texts


def test_chat_self_consistency_takes_the_requests_n(served):
    regex = r"[A-Z][a-z]+"
    _warm(served, "/v1/chat/completions", messages=[{"role": "user", "content": "Name a capital city."}])
    resp = _post(served, "/v1/chat/completions", messages=[{"role": "user", "content": "Name a capital city."}],
                 temperature=1.0, seed=SEED, max_tokens=8, n=5, self_consistency={"answer_regex": regex})
    assert len(resp["choices"]) == 5 and all(c["logprobs"] is None for c in resp["choices"])
    texts = [c["message"]["content"] for c in resp["choices"]]
    full = _post(served, "/v1/chat/completions", messages=[{"role": "user", "content": "Name a capital city."}],
                 temperature=1.0, seed=SEED, max_tokens=8, n=5, logprobs=True)
    assert [c["message"]["content"] for c in full["choices"]] == texts
    totals = [sum(t["logprob"] for t in c["logprobs"]["content"]) for c in full["choices"]]
    answers, votes, winner = _expected_vote(texts, totals, regex)
    assert resp["answer"] == winner and resp["votes"] == votes
    assert [c["answer"] for c in resp["choices"]] == answers


def test_majority_on_known_candidates():
    pattern = ttc.compile_answer_regex(r"answer is (\w+)")
    texts = ["so the answer is 12.", "the answer is 13", "answer is 13!", "no idea", "The answer is  12 ",
             "answer is 7"]
    answers = [ttc.extract_answer(t, pattern) for t in texts]
    assert answers == ["12", "13", "13", None, None, "7"]  # "The answer is  12 ": "is  12" has two spaces
    # 13 wins 2 to 1
    assert ttc.majority(answers, [-9.0, -1.0, -1.0, -0.5, 0.0, -3.0]) == ("13", {"13": 2, "12": 1, "7": 1})
    # a tie goes to the answer whose candidates' total logprob is higher
    assert ttc.majority(["a", "b", "b", "a"], [-1.0, -2.0, -2.5, -1.0])[0] == "a"
    assert ttc.majority(["a", "b", "b", "a"], [-3.0, -2.0, -2.5, -3.0])[0] == "b"
    assert ttc.majority([None, None], [0.0, 0.0]) == (None, {})
    whole = ttc.compile_answer_regex(r"\d+")  # no group: the whole match
    assert ttc.extract_answer("x 42 y 7", whole) == "42"


# ---- a judge ------------------------------------------------------------------------------------------------------
def test_scorer_rules_on_known_values():
    from tokenloom.engine.outputs import CompletionOutput

    text = {5: "Yes", 7: " yes", 9: "No", 11: "Yesterday"}.get
    reply = CompletionOutput(0, "Yes", [5], "length", logprobs=[{5: math.log(0.5), 7: math.log(0.2),
                                                                  9: math.log(0.1), 11: math.log(0.05)}])
    assert ttc.Scorer().score(reply, text) == pytest.approx(math.log(0.7))  # "Yes" and " yes", not "Yesterday"
    assert ttc.Scorer(label="no").score(reply, text) == pytest.approx(math.log(0.1))
    assert ttc.Scorer(label="maybe").score(reply, text) == pytest.approx(math.log(0.05))  # the bound: the lowest
    number = ttc.Scorer(method="number")
    assert [number.score(CompletionOutput(0, t, [1]), text) for t in (" 8/10", "Rating: -2.5", ".5", "none")] == [
        8.0, -2.5, 0.5, None]
    assert ttc.rank([1.0, None, 3.0, 1.0, -2.0]) == [2, 0, 3, 4, 1]
    t = ttc.Scorer(template="{prompt}|{completion}|{completion}|{other}")
    assert t.render("p {completion}", "c {prompt}") == "p {completion}|c {prompt}|c {prompt}|{other}"
    with pytest.raises(ttc.TTCError, match="completion"):
        ttc.Scorer(template="no placeholder")


def _yes_score(top: list[dict]) -> float:
    """log P(first token reads "yes") from the judge's top-20 first-token logprobs (the documented rule)."""
    hits = [t["logprob"] for t in top if t["token"].strip().casefold() == "yes"]
    if not hits:
        return min(t["logprob"] for t in top)
    return math.log(sum(math.exp(x) for x in hits))


def test_scorer_ranks_by_the_judges_yes_probability(served):
    common = dict(prompt=PROMPT, temperature=1.0, seed=SEED, max_tokens=8)
    _post(served, "/v1/completions", n=2, best_of=4, scorer={"model": MODEL}, **common)  # caches the judge prompts
    full = _post(served, "/v1/completions", n=4, **common)
    expected = []
    for c in full["choices"]:  # the judge asked directly: its default template, through its chat template
        text = ttc.DEFAULT_TEMPLATES["yes_logprob"].replace("{prompt}", PROMPT).replace("{completion}", c["text"])
        j = _post(served, "/v1/chat/completions", messages=[{"role": "user", "content": text}], temperature=0,
                  max_tokens=1, logprobs=True, top_logprobs=20)
        expected.append((_yes_score(j["choices"][0]["logprobs"]["content"][0]["top_logprobs"]), j["usage"]))
    resp = _post(served, "/v1/completions", n=2, best_of=4, scorer={"model": MODEL}, **common)
    scores = [s for s, _ in expected]
    want = _top(scores, 2)
    assert [c["text"] for c in resp["choices"]] == [full["choices"][i]["text"] for i in want]
    assert [c["score"] for c in resp["choices"]] == pytest.approx([scores[i] for i in want], abs=2e-3)
    assert resp["usage"]["completion_tokens"] == full["usage"]["completion_tokens"]
    assert resp["scorer_usage"]["prompt_tokens"] == sum(u["prompt_tokens"] for _, u in expected)
    assert resp["scorer_usage"]["completion_tokens"] == 4


def test_scorer_with_a_number_from_the_judge(served):
    template = "Rate from 1 to 10 how red this fruit is: {completion}\nRating (a number):"
    scorer = {"method": "number", "prompt": template, "chat": False, "max_tokens": 4}
    ask = dict(messages=[{"role": "user", "content": "Name a red fruit."}], temperature=1.0, seed=SEED, max_tokens=6,
               n=3)
    _post(served, "/v1/chat/completions", **ask, scorer=scorer)  # caches the prompt and the judge's prompts
    resp = _post(served, "/v1/chat/completions", **ask, scorer=scorer)
    full = _post(served, "/v1/chat/completions", messages=[{"role": "user", "content": "Name a red fruit."}],
                 temperature=1.0, seed=SEED, max_tokens=6, n=3)
    scores = []
    for c in full["choices"]:  # the judge asked directly: greedy, the raw template
        j = _post(served, "/v1/completions", prompt=template.replace("{completion}", c["message"]["content"]),
                  temperature=0, max_tokens=4)
        m = re.search(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)", j["choices"][0]["text"])
        scores.append(float(m.group()) if m else None)
    order = sorted(range(3), key=lambda i: (scores[i] is None, -(scores[i] or 0)))
    assert [c["message"]["content"] for c in resp["choices"]] == [full["choices"][i]["message"]["content"]
                                                                  for i in order]
    assert [c["score"] for c in resp["choices"]] == [scores[i] for i in order]


# ---- validation (OpenAI's rules), and nothing left behind -------------------------------------------------------
BAD = [
    ("/v1/completions", {"prompt": "x", "n": 3, "best_of": 2}, 400, "best_of", ">= n"),
    ("/v1/completions", {"prompt": "x", "best_of": 3, "stream": True}, 400, "best_of", "stream"),
    ("/v1/chat/completions", {"best_of": 2, "stream": True}, 400, "best_of", "stream"),
    ("/v1/chat/completions", {"n": 2, "best_of": 1}, 400, "best_of", ">= n"),
    ("/v1/completions", {"prompt": "x", "stream": True, "self_consistency": {"answer_regex": "a"}}, 400,
     "self_consistency", "stream"),
    ("/v1/chat/completions", {"stream": True, "scorer": {}}, 400, "scorer", "stream"),
    ("/v1/completions", {"prompt": "x", "self_consistency": {"answer_regex": "("}}, 400, "self_consistency",
     "regular expression"),
    ("/v1/completions", {"prompt": ["x", "y"], "self_consistency": {"answer_regex": "a"}}, 400, "prompt",
     "one prompt"),
    ("/v1/completions", {"prompt": "x", "best_of": 3, "self_consistency": {"answer_regex": "a"}}, 400,
     "self_consistency", "best_of"),
    ("/v1/completions", {"prompt": "x", "n": 3, "self_consistency": {"answer_regex": "a", "n": 4}}, 400, "n",
     "differ"),
    ("/v1/completions", {"prompt": "x", "scorer": {"prompt": "no placeholder"}}, 400, "scorer", "{completion}"),
    ("/v1/completions", {"prompt": "x", "scorer": {"method": "vibes"}}, 400, "scorer", "method"),
    ("/v1/completions", {"prompt": "x", "scorer": {"judge": "x"}}, 400, "scorer", "judge"),
    ("/v1/chat/completions", {"scorer": {"model": "no-such-model"}}, 404, "model", "no-such-model"),
]


@pytest.mark.parametrize("path,body,status,param,fragment", BAD)
def test_bad_ttc_requests_are_refused(served, path, body, status, param, fragment):
    if path.endswith("chat/completions"):
        body = {"messages": [{"role": "user", "content": "hi"}], **body}
    r = served.http.post(path, json={"max_tokens": 2, **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"], err
    stats = served.engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.num_blocks_used == 0


def test_openapi_documents_the_fields(served):
    schemas = served.http.get("/openapi.json").json()["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        assert {"best_of", "scorer", "self_consistency"} <= set(props)
    scorer = schemas["ScorerBody"]["properties"]
    assert "{completion}" in scorer["prompt"]["description"] and "log-probability" in scorer["method"]["description"]
    assert "capture group" in schemas["SelfConsistencyBody"]["properties"]["answer_regex"]["description"]


# ---- the Python API ---------------------------------------------------------------------------------------------
def test_python_api(default_llm):
    llm = default_llm
    params = SamplingParams(temperature=1.0, seed=SEED, max_tokens=8)
    full = llm.generate(SUM, SamplingParams(n=6, temperature=1.0, seed=SEED, max_tokens=8, logprobs=0))[0]
    means = [sum(e[t] for t, e in zip(o.token_ids, o.logprobs)) / len(o.token_ids) for o in full.outputs]
    ranked = ttc.best_of(llm, SUM, 6, params, keep=2)
    assert [o.token_ids for o in ranked.outputs] == [full.outputs[i].token_ids for i in _top(means, 2)]
    assert [o.token_ids for o in ranked.candidates] == [o.token_ids for o in full.outputs]

    vote = ttc.self_consistency(llm, SUM, 6, r"(\d+)", params)
    texts = [o.text for o in full.outputs]
    assert [o.text for o in vote.outputs] == texts
    totals = [sum(e[t] for t, e in zip(o.token_ids, o.logprobs)) for o in full.outputs]
    answers, votes, winner = _expected_vote(texts, totals, r"(\d+)")
    assert (vote.answer, vote.votes, vote.answers) == (winner, votes, answers)


def test_python_judge_score_matches_the_prompt_logprobs_path(default_llm):
    """The yes_logprob score (from the sampler's first-token logprobs) against the same distribution read from
    the prompt-logprob path: the judge prompt plus one token, its last position's top 20."""
    llm = default_llm
    tok = llm.tokenizer
    completions = ["Strawberries are red.", "The sky is blue.", "banana"]
    scores = ttc.score(llm, "Name a red fruit.", completions)
    for c, got in zip(completions, scores):
        text = ttc.DEFAULT_TEMPLATES["yes_logprob"].replace("{prompt}", "Name a red fruit.").replace(
            "{completion}", c)
        ids = llm.chat_prompt_ids([{"role": "user", "content": text}])
        out = llm.generate(ids + [0], SamplingParams(max_tokens=1, prompt_logprobs=20))[0]
        top = sorted(out.prompt_logprobs[-1].items(), key=lambda kv: -kv[1])[:20]
        hits = [lp for t, lp in top if tok.decode([t]).strip().casefold() == "yes"]
        want = math.log(sum(math.exp(x) for x in hits)) if hits else top[-1][1]
        assert got == pytest.approx(want, abs=2e-3)
    ranked = ttc.best_of(llm, [{"role": "user", "content": "Name a red fruit."}], 3,
                         SamplingParams(temperature=1.0, seed=SEED, max_tokens=6), scorer=ttc.Scorer())
    assert ranked.scores[0] == max(s for s in ranked.candidate_scores if s is not None)
    assert ranked.best.text == ranked.candidates[ranked.candidate_scores.index(ranked.scores[0])].text


def test_the_judge_may_be_another_served_model():
    """Many models, one server: candidates from one variant, judged by another (loaded on demand)."""
    from test_many_models import _pool

    server = _pool(keep_alive_s=300)
    judge = f"{MODEL}:int8"
    ask = dict(model=MODEL, prompt=PROMPT, temperature=1.0, seed=SEED, max_tokens=6)
    try:
        http = httpx.Client(base_url=server.url, timeout=300)

        def post(path, **body):
            r = http.post(path, json=body)
            assert r.status_code == 200, r.text
            return r.json()

        post("/v1/completions", **ask, best_of=3, scorer={"model": judge})  # loads both, caches their prompts
        assert sorted(server.loads) == [MODEL, judge]
        full = post("/v1/completions", **ask, n=3)
        scores = []
        for c in full["choices"]:
            text = ttc.DEFAULT_TEMPLATES["yes_logprob"].replace("{prompt}", PROMPT).replace("{completion}", c["text"])
            j = post("/v1/chat/completions", model=judge, messages=[{"role": "user", "content": text}],
                     temperature=0, max_tokens=1, logprobs=True, top_logprobs=20)
            scores.append(_yes_score(j["choices"][0]["logprobs"]["content"][0]["top_logprobs"]))
        resp = post("/v1/completions", **ask, best_of=3, scorer={"model": judge})
        best = _top(scores, 1)[0]
        assert resp["model"] == MODEL and resp["choices"][0]["text"] == full["choices"][best]["text"]
        assert resp["choices"][0]["score"] == pytest.approx(scores[best], abs=2e-3)
        assert sorted(server.loads) == [MODEL, judge]  # nothing loaded twice
    finally:
        server.stop()
