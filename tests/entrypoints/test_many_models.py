"""Many models, one server (`tokenloom serve` without a model): variants by tag loaded on demand side by side,
keep-alive and expiry, LRU under --max-loaded-models, the memory budget, A/B routes, and Open WebUI's calls.

References are independent: each variant's greedy answer is the offline LLM's with the same settings, and route
splits are checked against binomial bounds."""
from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.entrypoints.test_server import RunningServer

MODEL = "smollm2-135m"
ENGINE = dict(max_model_len=512, kv_cache_memory=48 << 20, max_num_seqs=16)
CHAT = [{"role": "user", "content": "Name a colour."}]
PROMPT = "The loom is"
pytestmark = pytest.mark.slow


def _pool(routes=None, load_delay_s=0.0, **config):
    from tokenloom.engine.async_engine import AsyncEngine
    from tokenloom.entrypoints.engine_args import EngineArgs
    from tokenloom.entrypoints.model_pool import ModelPool, ModelSources, PoolConfig
    from tokenloom.entrypoints.routing import Router
    from tokenloom.entrypoints.server import build_app
    from tokenloom.loader.variants import estimate_weight_bytes

    base = EngineArgs(**ENGINE)
    loads = []

    def load(variant, source):  # on the pool's loading thread
        loads.append(variant.name)
        time.sleep(load_delay_s)  # a load as slow as a larger model's, where a test needs one to be under way
        return AsyncEngine(dataclasses.replace(base, model=source, **variant.overrides).create_llm().engine).start()

    pool = ModelPool(PoolConfig(**config), factory=load, estimate=estimate_weight_bytes,
                     sources=ModelSources([MODEL]))
    app = build_app(None, pool=pool, max_queue=256, router=Router(routes=routes or {}, seed=7))
    server = RunningServer(app)
    server.pool, server.loads = pool, loads
    return server


@pytest.fixture(scope="module")
def references(default_gguf):
    """Greedy answers of each variant, run offline with the same settings."""
    from tokenloom import LLM, SamplingParams
    from tokenloom.loader.variants import variant

    out = {}
    params = SamplingParams(temperature=0, max_tokens=8)
    for tag in ("latest", "int8", "bf16"):
        v = variant(MODEL, tag)
        llm = LLM(MODEL, **ENGINE, **v.overrides)
        out[v.name] = llm.generate([PROMPT], params)[0].outputs[0].text
        del llm
    return out


def _complete(url, model, prompt=PROMPT, **extra):
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}
    return httpx.post(url + "/v1/completions", json=body, timeout=300)


def _ps(url) -> dict:
    return {m["name"]: m for m in httpx.get(url + "/api/ps", timeout=30).json()["models"]}


def _wait(predicate, timeout=20.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def _rss(url) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        if fam.name == "process_resident_memory_bytes":
            return fam.samples[0].value
    raise AssertionError("no process_resident_memory_bytes")


def test_variants_load_on_demand_side_by_side_and_unload(references):
    server = _pool(keep_alive_s=300)
    url = server.url
    try:
        assert _ps(url) == {}
        names = {m["name"] for m in httpx.get(url + "/api/tags").json()["models"]}
        assert {MODEL, f"{MODEL}:int8", f"{MODEL}:bf16", f"{MODEL}:int4"} <= names
        assert {f"{MODEL}:bf16", f"{MODEL}:f32"} <= {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
        rss_before = _rss(url)
        with ThreadPoolExecutor(2) as ex:  # two variants asked for at once: both load, both answer
            answers = list(ex.map(lambda m: _complete(url, m), [f"{MODEL}:int8", f"{MODEL}:bf16"]))
        for r, name in zip(answers, [f"{MODEL}:int8", f"{MODEL}:bf16"]):
            assert r.status_code == 200, r.text
            assert r.json()["model"] == name and r.json()["choices"][0]["text"] == references[name]
        ps = _ps(url)
        assert set(ps) == {f"{MODEL}:int8", f"{MODEL}:bf16"}
        assert ps[f"{MODEL}:int8"]["details"]["quantization_level"] == "Q8_0"
        assert ps[f"{MODEL}:bf16"]["size"] > ps[f"{MODEL}:int8"]["size"] > 0
        # both answer concurrently now, each from its own engine, with nothing loaded again
        with ThreadPoolExecutor(4) as ex:
            again = list(ex.map(lambda m: _complete(url, m), [f"{MODEL}:int8", f"{MODEL}:bf16"] * 2))
        assert all(r.status_code == 200 for r in again) and sorted(server.loads) == [f"{MODEL}:bf16", f"{MODEL}:int8"]
        # a load (int4: quantized at load, seconds) does not stall requests to a loaded model
        loader = threading.Thread(target=_complete, args=(url, f"{MODEL}:int4"))
        loader.start()
        _wait(lambda: f"{MODEL}:int4" in server.pool._loading)
        r = _complete(url, f"{MODEL}:int8")
        assert r.status_code == 200 and f"{MODEL}:int4" not in server.pool.loaded  # answered during the load
        loader.join()
        assert f"{MODEL}:int4" in _ps(url)

        # Ollama: an empty prompt preloads (load_duration reported); keep_alive 0 unloads at once
        r = httpx.post(url + "/api/generate", json={"model": MODEL, "prompt": ""}, timeout=300).json()
        assert r["done_reason"] == "load" and r["load_duration"] > 0 and MODEL in _ps(url)
        warm = httpx.post(url + "/api/generate", json={"model": MODEL, "prompt": "", "keep_alive": "1s"}).json()
        assert warm["load_duration"] < r["load_duration"]  # already loaded
        _wait(lambda: MODEL not in _ps(url), timeout=10)  # expired 1 s after its last request
        r = httpx.post(url + "/api/generate", json={"model": f"{MODEL}:bf16", "prompt": "", "keep_alive": 0}).json()
        assert r["done_reason"] == "unload"
        _wait(lambda: f"{MODEL}:bf16" not in _ps(url))
        rss_mid = _rss(url)
        for name in (f"{MODEL}:int8", f"{MODEL}:int4"):
            httpx.post(url + "/api/generate", json={"model": name, "prompt": "", "keep_alive": 0})
        _wait(lambda: _ps(url) == {})
        _wait(lambda: _rss(url) < rss_mid, timeout=10)  # unloading gives the memory back
        assert _rss(url) < rss_before + 150e6
    finally:
        server.stop()


def test_lru_under_one_loaded_model_keeps_serving_correctly(references):
    server = _pool(max_loaded_models=1)
    url = server.url
    seen_loaded = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen_loaded.append(len(server.pool.loaded))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        order = [MODEL, f"{MODEL}:int8", MODEL, f"{MODEL}:bf16", f"{MODEL}:int8"]
        for name in order:  # one at a time: each answer equals its variant's batch-1 reference
            r = _complete(url, name)
            assert r.status_code == 200, r.text
            assert (r.json()["model"], r.json()["choices"][0]["text"]) == (name, references[name])
        with ThreadPoolExecutor(3) as ex:  # at once: requests wait for the busy model, then it is swapped
            answers = list(ex.map(lambda m: _complete(url, m), order * 2))
        assert [(r.status_code, r.json()["model"]) for r in answers] == [(200, name) for name in order * 2]
        assert max(seen_loaded) <= 1 and len(_ps(url)) == 1
        assert len(server.loads) >= len(order)  # it swapped every time
    finally:
        stop.set()
        server.stop()


def test_unknown_names_and_the_memory_budget():
    server = _pool(memory_budget_bytes=200 << 20)  # the Q4_1 file fits; bf16 (~270 MB) does not
    url = server.url
    try:
        r = _complete(url, "no-such-model")
        assert r.status_code == 404 and MODEL in r.json()["error"]["message"]
        r = httpx.post(url + "/api/chat", json={"model": f"{MODEL}:q9", "messages": CHAT})
        assert r.status_code == 404 and f"{MODEL}:int8" in r.json()["error"]
        assert _complete(url, MODEL).status_code == 200
        r = _complete(url, f"{MODEL}:bf16")
        assert r.status_code == 507 and "memory budget" in r.json()["error"]["message"], r.text
        assert set(_ps(url)) == {MODEL} and _complete(url, MODEL).status_code == 200  # nothing lost
        r = httpx.post(url + "/api/generate", json={"model": MODEL, "prompt": "", "keep_alive": "soon"})
        assert r.status_code == 400 and "keep_alive" in r.json()["error"]
        r = _complete(url, MODEL, max_tokens=4096)  # past the context window: a 400 counted against the model
        assert r.status_code == 400, r.text
        errors = [line for line in httpx.get(url + "/metrics").text.splitlines()
                  if line.startswith("tokenloom_request_errors_total{")]
        assert errors == [f'tokenloom_request_errors_total{{model_name="{MODEL}",status="400"}} 1.0'], errors
    finally:
        server.stop()


def _binomial_ok(k: int, n: int, p: float) -> bool:
    return abs(k - n * p) <= 4 * math.sqrt(n * p * (1 - p))


def test_routes_split_stick_and_change_without_dropping_requests():
    from prometheus_client.parser import text_string_to_metric_families

    a, b = MODEL, f"{MODEL}:int8"
    server = _pool(routes={"chat": {a: 1, b: 1}})
    url = server.url
    try:
        def ask(user=None):
            body = {"model": "chat", "prompt": PROMPT, "max_tokens": 1, **({"user": user} if user else {})}
            r = httpx.post(url + "/v1/completions", json=body, timeout=300)
            assert r.status_code == 200, r.text
            return r.json()["model"]

        with ThreadPoolExecutor(8) as ex:
            chosen = list(ex.map(lambda _: ask(), range(200)))
        assert set(chosen) == {a, b} and _binomial_ok(chosen.count(a), 200, 0.5), chosen.count(a)
        for user in ("alice", "bob", "carol", "dave"):
            assert len({ask(user) for _ in range(5)}) == 1  # sticky per user
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
        routed = {s.labels["model_name"]: s.value for s in families["tokenloom_route_requests"].samples
                  if s.name.endswith("_total")}
        assert routed[a] + routed[b] == 220
        quality = {s.labels["model_name"]: s.value for s in families["tokenloom_generation_mean_logprob"].samples
                   if s.name.endswith("_count")}
        assert quality[a] >= chosen.count(a) and quality[b] >= chosen.count(b)  # every routed answer scored
        assert all(s.value <= 0 for s in families["tokenloom_generation_mean_logprob"].samples
                   if s.name.endswith("_sum"))

        # a route change applies at once, and a stream already running on the old variant finishes
        with httpx.stream("POST", url + "/v1/completions", timeout=300, json={
                "model": "chat", "prompt": PROMPT, "max_tokens": 24, "ignore_eos": True, "stream": True,
                "user": "erin"}) as stream:
            lines = stream.iter_lines()
            first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
            other = b if first["model"] == a else a
            r = httpx.post(url + "/admin/routes", json={"chat": {other: 1.0}})
            assert r.status_code == 200 and r.json() == {"chat": {other: 1.0}}
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["model"] == first["model"]
        assert {ask("erin") for _ in range(3)} == {other}
        assert httpx.get(url + "/admin/routes").json() == {"chat": {other: 1.0}}
        bad = httpx.post(url + "/admin/routes", json={"chat": {a: -1}})
        assert bad.status_code == 400 and httpx.get(url + "/admin/routes").json() == {"chat": {other: 1.0}}
    finally:
        server.stop()


def test_open_webui_calls_with_a_model_switch():
    """The calls Open WebUI makes against an Ollama server: list, running models, details, then a chat whose
    model changes between messages (the history carries over)."""
    server = _pool()
    url = server.url
    try:
        assert httpx.get(url + "/api/version").json()["version"]
        tags = httpx.get(url + "/api/tags").json()["models"]
        assert {t["model"] for t in tags} >= {MODEL, f"{MODEL}:int8"}
        assert all({"name", "model", "size", "digest", "details", "modified_at"} <= set(t) for t in tags)
        assert httpx.get(url + "/api/ps").json() == {"models": []}
        show = httpx.post(url + "/api/show", json={"model": f"{MODEL}:int8"}).json()
        assert show["details"]["quantization_level"] == "Q8_0" and "completion" in show["capabilities"]
        history = list(CHAT)
        for model in (MODEL, f"{MODEL}:int8"):
            with httpx.stream("POST", url + "/api/chat", timeout=300, json={
                    "model": model, "messages": history, "stream": True, "options": {"num_predict": 6}}) as r:
                assert r.status_code == 200
                parts = [json.loads(line) for line in r.iter_lines() if line]
            assert all(p["model"] == model for p in parts) and parts[-1]["done"]
            history += [{"role": "assistant", "content": "".join(p["message"]["content"] for p in parts)},
                        {"role": "user", "content": "Another one?"}]
        running = httpx.get(url + "/api/ps").json()["models"]
        assert [m["name"] for m in running] == [f"{MODEL}:int8", MODEL]  # most recently used first
        assert all(m["expires_at"] > time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) for m in running)
    finally:
        server.stop()


def test_route_and_keep_alive_parsing():
    from tokenloom.config import TokenloomError, parse_duration
    from tokenloom.entrypoints.routing import Router, RoutesError

    assert [parse_duration(v) for v in ("5m", "1h30m", "-1", 0, "250ms", None)] == [300, 5400, -1, 0, 0.25, None]
    for bad in ("soon", "5 m", True, "m5"):
        with pytest.raises(TokenloomError):
            parse_duration(bad)
    router = Router(routes={"r": {"x": 3, "y": 1}}, seed=1)
    picks = [router.choose("r") for _ in range(4000)]
    assert _binomial_ok(picks.count("x"), 4000, 0.75) and router.choose("not-a-route") is None
    assert {router.choose("r", "u1") for _ in range(20)} == {router.choose("r", "u1")}
    for bad in ({"r": {}}, {"r": {"x": 0}}, {"r": {"x": "1"}}, {"": {"x": 1}}, ["x"]):
        with pytest.raises(RoutesError):
            Router(routes=bad)


def test_serve_cli_models_dir_routes_sighup_and_expiry(tiny_llama, tmp_path):
    """`tokenloom serve` without a model over a --models-dir, a --routes file changed and re-read on SIGHUP
    (a bad file keeps the routes in force), and --keep-alive expiry."""
    import signal
    import shutil

    from tests.entrypoints.test_server import start_serve

    path, _ = tiny_llama
    models = tmp_path / "models"
    for name in ("tiny-a", "tiny-b"):
        shutil.copytree(path, models / name)
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps({"r": {"tiny-a": 1}}))
    proc, url = start_serve("--models-dir", str(models), "--routes", str(routes), "--keep-alive", "1s",
                            "--dtype", "float32", "--max-model-len", "256", "--kv-cache-memory", "8MiB")
    try:
        def ask(model):
            r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": [1, 2, 3], "max_tokens": 2},
                           timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["model"]

        assert {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]} >= {"tiny-a", "tiny-b:int8", "r"}
        assert ask("r") == "tiny-a" and ask("tiny-b") == "tiny-b"
        routes.write_text(json.dumps({"r": {"tiny-b": 1}}))
        proc.send_signal(signal.SIGHUP)
        _wait(lambda: ask("r") == "tiny-b")
        routes.write_text("{not json")
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None and ask("r") == "tiny-b"  # the routes in force stay
        _wait(lambda: _ps(url) == {}, timeout=15)  # both expire 1 s after their last request
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_client_gone_mid_load_leaves_no_orphan_engine():
    """The load a request started finishes without it, and the model then expires as if it had been used. The
    load takes at least 2 s, so the client's 0.3 s timeout always falls inside it (the default model alone can
    load faster than that)."""
    server = _pool(load_delay_s=2.0)
    url = server.url
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/api/generate", json={"model": MODEL, "prompt": "", "keep_alive": "1s"}, timeout=0.3)
        _wait(lambda: MODEL in _ps(url), timeout=120)
        _wait(lambda: _ps(url) == {}, timeout=30)
        assert server.loads == [MODEL] and not server.pool._loading
        assert _complete(url, MODEL).status_code == 200 and server.loads == [MODEL, MODEL]
    finally:
        server.stop()
