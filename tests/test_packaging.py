"""The Dockerfile, .dockerignore and compose.yaml, checked without Docker (no image can be pulled or built here):
the image installs what the README's install line installs (the same CPU torch, then tokenloom itself); the files
it COPYs are enough for `pip install .` to build a complete package (the wheel is built here from exactly those
files); its ENTRYPOINT + CMD parse with `tokenloom serve`'s own parser, every flag spelled as the parser spells it;
its HEALTHCHECK asks a route the app serves, and the check's own code exits 0 against a real server, non-zero
when the engine is down or nothing listens; compose.yaml wires Open WebUI to the service by name and port, and
waits for the healthcheck. Where a `docker compose` CLI exists, it validates compose.yaml too."""
from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# ---- reading the files ----------------------------------------------------------------------------------------
def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    out, cur = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        s = line.strip()
        if not s or s.startswith("#"):  # also inside a continued instruction, as Docker reads them
            continue
        if s.endswith("\\"):
            cur += s[:-1].strip() + " "
            continue
        cur += s
        keyword, _, args = cur.partition(" ")
        out.append((keyword.upper(), args.strip()))
        cur = ""
    assert not cur, "the Dockerfile ends inside a continued instruction"
    return out


def only(keyword: str) -> str:
    found = [args for k, args in dockerfile() if k == keyword]
    assert len(found) == 1, f"expected one {keyword}, got {found}"
    return found[0]


def exec_form(args: str) -> list[str]:
    """An instruction's JSON-array (exec) form; the shell form would run it under /bin/sh -c, which does not pass
    SIGTERM on to tokenloom."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(x, str) for x in value), args
    return value


def healthcheck() -> tuple[dict[str, str], list[str]]:
    options, _, cmd = only("HEALTHCHECK").partition(" CMD ")
    opts = dict(o.removeprefix("--").split("=", 1) for o in options.split())
    return opts, exec_form(cmd)


def health_url() -> str:
    _, cmd = healthcheck()
    assert cmd[:2] == ["python", "-c"] and len(cmd) == 3, cmd  # slim has no curl
    urls = re.findall(r"""['"](http://[^'"]+)['"]""", cmd[2])
    assert len(urls) == 1, cmd
    return urls[0]


def serve_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    from tokenloom.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices["serve"]


def compose() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def readme_torch_pin() -> str:
    install = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("pip install"))
    return re.search(r"\btorch==([\w.+]+)", install).group(1)


def dockerignore() -> list[str]:
    return [p.strip().rstrip("/") for p in (ROOT / ".dockerignore").read_text().splitlines()
            if p.strip() and not p.strip().startswith("#")]


def _dockerignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as Docker reads it: `*` and `?` within one path element, `**` across them."""
    rx, k = "", 0
    while k < len(pattern):
        if pattern.startswith("**/", k):
            rx, k = rx + "(?:.*/)?", k + 3
        elif pattern.startswith("**", k):
            rx, k = rx + ".*", k + 2
        else:
            rx, k = rx + {"*": "[^/]*", "?": "[^/]"}.get(pattern[k], re.escape(pattern[k])), k + 1
    return re.compile(rx)


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore drops `path` from the build context: it, or a folder above it, matches a pattern."""
    parts = Path(path).parts
    return any(_dockerignore_regex(pat).fullmatch("/".join(parts[:k]))
               for pat in patterns for k in range(1, len(parts) + 1))


def copy_sources() -> list[str]:
    """The paths the Dockerfile's COPY instructions take from the build context."""
    out = []
    for k, args in dockerfile():
        if k == "COPY":
            words = exec_form(args) if args.startswith("[") else args.split()
            out += [w for w in words[:-1] if not w.startswith("--")]
    return out


# ---- the Dockerfile -------------------------------------------------------------------------------------------
def test_dockerfile_installs_what_the_readme_installs():
    steps = dockerfile()
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = [args for k, args in steps if k == "RUN"]
    pin = readme_torch_pin()
    torch_runs = [k for k, r in enumerate(runs) if re.search(r"\btorch==", r)]
    assert len(torch_runs) == 1, runs
    torch_cmd = shlex.split(runs[torch_runs[0]])
    assert torch_cmd[:2] == ["pip", "install"] and f"torch=={pin}" in torch_cmd, torch_cmd
    assert torch_cmd[torch_cmd.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"  # the CPU build
    own = [k for k, r in enumerate(runs) if re.search(r"(^|&&\s*)pip install \.(\s|$)", r)]
    assert len(own) == 1 and torch_runs[0] < own[0], runs  # torch first: tokenloom's dependencies leave it out
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in deps if re.match(r"torch\b", d)], "a torch requirement would let pip replace the CPU wheel"


def test_dockerfile_settings():
    steps = dockerfile()
    keywords = [k for k, _ in steps]
    runs = " && ".join(args for k, args in steps if k == "RUN")
    envs = " ".join(args for k, args in steps if k == "ENV")
    assert re.search(r"(^|\s)TOKENLOOM_HOME=/models(\s|$)", envs), envs
    volume = only("VOLUME")
    assert (exec_form(volume) if volume.startswith("[") else volume.split()) == ["/models"]
    assert only("EXPOSE") == "11434"
    # a user of its own, set before the server starts, owning /models before VOLUME (later changes are lost)
    user = only("USER").split(":")[0]
    assert user not in ("root", "0") and keywords.index("USER") < keywords.index("ENTRYPOINT")
    useradd = next(shlex.split(cmd) for cmd in re.split(r"&&|;", runs) if "useradd" in cmd)
    uid = useradd[useradd.index("--uid") + 1]
    name = useradd[-1]
    assert user in (uid, name), (user, useradd)
    chown = [k for k, (kw, args) in enumerate(steps) if kw == "RUN" and re.search(r"chown (\S+) /models", args)]
    assert chown and chown[0] < keywords.index("VOLUME")
    owner = re.search(r"chown (\S+) /models", steps[chown[0]][1]).group(1).split(":")[0]
    assert owner in (uid, name)


def test_entrypoint_is_tokenloom_serve_with_flags_it_knows():
    entry, cmd = exec_form(only("ENTRYPOINT")), exec_form(only("CMD"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry[:2] == ["tokenloom", "serve"] and scripts["tokenloom"] == "tokenloom.cli.main:main"
    parser, serve = serve_parser()
    argv = entry[1:] + cmd
    for word in argv:  # spelled in full (argparse would also take an unambiguous prefix)
        if word.startswith("-"):
            assert word.split("=", 1)[0] in serve._option_string_actions, f"`tokenloom serve` has no {word}"
    args = parser.parse_args(argv)
    from tokenloom.loader.sources import DEFAULT_MODEL

    assert (args.command, args.host, args.port, args.model) == ("serve", "0.0.0.0", 11434, DEFAULT_MODEL)
    assert args.port == int(only("EXPOSE")) == int(re.search(r":(\d+)/", health_url()).group(1))
    service = compose()["services"]["tokenloom"]
    if "command" in service:  # compose's command replaces CMD
        command = service["command"] if isinstance(service["command"], list) else shlex.split(service["command"])
        assert parser.parse_args(entry[1:] + command).command == "serve"


def test_dockerignore_keeps_what_the_build_copies():
    patterns = dockerignore()
    sources = copy_sources()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for needed in ("pyproject.toml", project["readme"], "tokenloom"):
        assert needed in sources, f"the image does not COPY {needed}, which `pip install .` needs"
    for s in sources:
        assert (ROOT / s).exists() and not ignored(s, patterns), s
    for dropped in (".git/config", "tests/conftest.py", "tokenloom/__pycache__/x.pyc", "tokenloom.egg-info/PKG-INFO",
                    "build/lib/tokenloom/config.py"):
        assert ignored(dropped, patterns), dropped
    assert not ignored("tokenloom/csrc/cpu_ops.cpp", patterns)


def _project_files(prefix: str) -> set[str]:
    """Tracked and new (not ignored) files under prefix; every file of the tree where git is not at hand."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", prefix], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
        return {f for f in out if (ROOT / f).is_file()}
    except (OSError, subprocess.CalledProcessError):
        return {str(p.relative_to(ROOT)) for p in (ROOT / prefix).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}


def test_the_copied_files_build_the_whole_package(tmp_path):
    """What `COPY` brings into the image, built as `pip install .` builds it: the wheel holds every file of the
    package (the C++ kernel sources and the web chat too, which only package-data brings) and the console script."""
    patterns = dockerignore()
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for s in copy_sources():
        if (ROOT / s).is_dir():
            shutil.copytree(ROOT / s, ctx / s, ignore=lambda d, names: [
                n for n in names if ignored(str((Path(d) / n).relative_to(ROOT)), patterns)])
        else:
            shutil.copy(ROOT / s, ctx / s)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          str(ctx), "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("tokenloom-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    expected = {f for f in _project_files("tokenloom") if not f.endswith(".pyc")}
    assert expected and not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    assert re.search(r"^tokenloom = tokenloom\.cli\.main:main$", entry_points, re.M), entry_points


# ---- the healthcheck, against the real app ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_app(tiny_llama):
    import uvicorn

    from tokenloom import LLM
    from tokenloom.engine.async_engine import AsyncEngine
    from tokenloom.entrypoints.server import build_app

    path, _ = tiny_llama
    llm = LLM(str(path), dtype="float32", max_model_len=1024, kv_cache_memory=16 << 20)
    aengine = AsyncEngine(llm.engine).start()
    app = build_app(aengine, None)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield app, aengine, port, server, thread
    server.should_exit = True
    thread.join(15)
    aengine.shutdown()


def _run_healthcheck(port: int) -> int:
    _, cmd = healthcheck()
    code = cmd[2].replace(health_url(), re.sub(r":\d+/", f":{port}/", health_url()))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode


def test_healthcheck_asks_a_route_of_the_app(tiny_app):
    app, aengine, port, server, thread = tiny_app
    gets = {path for path, ops in app.openapi()["paths"].items() if "get" in ops}  # every route, routers' too
    path = "/" + health_url().split("/", 3)[3]
    assert path in gets, sorted(gets)
    # what Open WebUI asks of its Ollama and OpenAI connections to list the models
    assert {"/api/tags", "/api/version", "/v1/models"} <= gets
    opts, _ = healthcheck()
    assert set(opts) <= {"interval", "timeout", "start-period", "start-interval", "retries"}, opts
    assert _run_healthcheck(port) == 0
    aengine.shutdown()  # the engine down: /health answers 503, the check fails
    assert _run_healthcheck(port) != 0
    server.should_exit = True
    thread.join(15)
    assert _run_healthcheck(port) != 0  # nothing listening


# ---- compose.yaml ---------------------------------------------------------------------------------------------
def test_compose_wires_open_webui_to_tokenloom():
    doc = compose()
    services = doc["services"]
    port = only("EXPOSE")
    tl = services["tokenloom"]
    build = tl["build"]
    assert (build if isinstance(build, str) else build.get("context", ".")) in (".", "./")
    assert f"{port}:{port}" in [str(p) for p in tl["ports"]]
    volumes = [str(v).split(":") for v in tl["volumes"]]
    assert any(len(v) >= 2 and v[1] == "/models" and v[0] in (doc.get("volumes") or {}) for v in volumes), volumes
    ui = services["open-webui"]
    assert ui["image"] == "ghcr.io/open-webui/open-webui:main"
    env = environment(ui)
    assert env["OLLAMA_BASE_URL"] == f"http://tokenloom:{port}"
    assert env["OPENAI_API_BASE_URL"] == f"http://tokenloom:{port}/v1"
    assert ui["depends_on"]["tokenloom"]["condition"] == "service_healthy"
    # service_healthy needs a healthcheck: the image's, unless compose sets (or disables) one
    assert "healthcheck" not in tl and only("HEALTHCHECK")
    # SIGTERM lets requests finish for --shutdown-timeout (30 s): compose must wait longer before it kills
    grace = str(tl.get("stop_grace_period", "10s"))
    assert grace.endswith("s") and float(grace[:-1]) > 30, grace


def _compose_cli() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        try:
            if subprocess.run(cmd + ["version"], capture_output=True, timeout=30).returncode == 0:
                return cmd
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


def test_compose_config_validates():
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker compose CLI here")
    out = subprocess.run(cli + ["-f", str(ROOT / "compose.yaml"), "config", "--quiet"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
