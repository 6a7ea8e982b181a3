"""LoRA over HTTP: `--lora-modules`, requests choosing an adapter by `model` (answers equal the offline engine's
with that adapter, and a mixed load of base and adapters), /v1/models and /api/tags listing adapters with their
base, /v1/load_lora_adapter and /v1/unload_lora_adapter at run time, and 400s that name the problem."""
from __future__ import annotations

import sys
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.entrypoints.test_server import start_serve
from tests.lora.test_lora import _edit_config, adapters, make_adapter  # noqa: F401  (the fixture)
from tokenloom import LLM, SamplingParams

PROMPTS = [[5, 17, 42, 7, 99, 3], [8, 8, 120, 64, 2, 31, 77], [250, 11, 6]]
ENGINE = ["--dtype", "float32", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8", "--max-model-len", "256",
          "--kv-cache-memory", "8MiB"]


@pytest.fixture(scope="module")
def server(tiny_llama, adapters):  # noqa: F811
    path, _ = tiny_llama
    proc, url = start_serve(str(path), *ENGINE, "--served-model-name", "base", "--lora-modules",
                            f"all={adapters['all'][0].lora_path}", f"rs={adapters['rs'][0].lora_path}",
                            stderr=sys.stderr)
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def _complete(url, model, prompt, n=6):
    r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n,
                                                   "temperature": 0, "ignore_eos": True, "logprobs": 0}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _ids(body) -> list[int]:
    """The generated token ids (the tiny model has no tokenizer: tokens read '<id>')."""
    return [int(t.strip("<>")) for t in body["choices"][0]["logprobs"]["tokens"]]


def test_adapters_by_model_name_equal_the_offline_engine(tiny_llama, adapters, server):  # noqa: F811
    path, _ = tiny_llama
    llm = LLM(str(path), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = {name: [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, lora_request=lora)]
            for name, lora in [("base", None), ("all", adapters["all"][0]), ("rs", adapters["rs"][0])]}
    assert want["all"] != want["base"] != want["rs"]
    jobs = [(name, i) for name in want for i in range(len(PROMPTS))] * 2
    with ThreadPoolExecutor(8) as ex:  # base and adapters mixed in the server's batches
        got = list(ex.map(lambda job: _complete(server, job[0], PROMPTS[job[1]]), jobs))
    for (name, i), body in zip(jobs, got):
        assert body["model"] == name and _ids(body) == list(want[name][i]), (name, i)


def test_models_and_tags_list_adapters_with_their_base(server):
    cards = {c["id"]: c for c in httpx.get(server + "/v1/models").json()["data"]}
    assert cards["all"]["parent"] == cards["rs"]["parent"] == "base" and cards["base"]["parent"] is None
    tags = {t["name"]: t for t in httpx.get(server + "/api/tags").json()["models"]}
    assert tags["all"]["details"]["parent_model"] == "base"


def test_load_and_unload_at_run_time_and_bad_adapters(tiny_llama, adapters, server, tmp_path):  # noqa: F811
    kq = adapters["kq"][0].lora_path
    before = _ids(_complete(server, "base", PROMPTS[1]))
    r = httpx.post(server + "/v1/load_lora_adapter", json={"lora_name": "kq", "lora_path": kq})
    assert r.status_code == 200 and "kq" in r.text
    assert _complete(server, "kq", PROMPTS[1])["model"] == "kq"
    r = httpx.post(server + "/v1/load_lora_adapter", json={"lora_name": "kq", "lora_path": kq})
    assert r.status_code == 400 and "taken" in r.json()["error"]["message"]
    assert httpx.post(server + "/v1/unload_lora_adapter", json={"lora_name": "kq"}).status_code == 200
    r = httpx.post(server + "/v1/completions", json={"model": "kq", "prompt": PROMPTS[1], "max_tokens": 2})
    assert r.status_code == 404
    r = httpx.post(server + "/v1/unload_lora_adapter", json={"lora_name": "kq"})
    assert r.status_code == 404
    # rank above --max-lora-rank, a module the model lacks, another base model: 400s naming the problem
    path, hf = tiny_llama
    big = tmp_path / "big"
    make_adapter(hf, big, seed=3, r=16, lora_alpha=16, target_modules=["q_proj"])  # --max-lora-rank is 8
    r = httpx.post(server + "/v1/load_lora_adapter", json={"lora_name": "big", "lora_path": str(big)})
    assert r.status_code == 400 and "rank" in r.json()["error"]["message"], r.text
    odd = _edit_config(Path(adapters["all"][0].lora_path), tmp_path / "odd", target_modules=["q_proj", "wq_nowhere"])
    r = httpx.post(server + "/v1/load_lora_adapter", json={"lora_name": "odd", "lora_path": str(odd)})
    assert r.status_code == 400 and "wq_nowhere" in r.json()["error"]["message"], r.text
    r = httpx.post(server + "/v1/load_lora_adapter", json={"lora_name": "gone", "lora_path": str(tmp_path / "no")})
    assert r.status_code == 400
    assert _ids(_complete(server, "base", PROMPTS[1])) == before  # nothing disturbed
    assert {c["id"] for c in httpx.get(server + "/v1/models").json()["data"]} == {"base", "all", "rs"}
