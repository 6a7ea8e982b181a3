"""`tokenloom pull`, `list`, `show`, `create`, `cp` and `rm`: the model catalogue, what is cached, and created
models (Ollama's Modelfiles: tokenloom/loader/created.py, the same store `tokenloom serve`'s /api/create uses)."""
from __future__ import annotations


def cmd_pull(args):
    from tokenloom.loader.sources import pull

    path = pull(args.model)
    print(f"{args.model}: {path} ({path.stat().st_size / 1e6:.1f} MB)")


def cmd_list(args):
    from tokenloom.loader.created import list_created
    from tokenloom.loader.sources import CATALOGUE, list_models

    cached = {name: (path, size) for name, path, size in list_models()}
    print(f"{'NAME':<20} {'SIZE':>10}  {'STATUS':<12} DESCRIPTION")
    for name, entry in CATALOGUE.items():
        size = f"{cached[name][1] / 1e6:.1f} MB" if name in cached else "-"
        print(f"{name:<20} {size:>10}  {'downloaded' if name in cached else 'not pulled':<12} {entry.description}")
    for m in list_created():
        print(f"{m.name:<20} {'-':>10}  {'created':<12} from {m.parent}" + (f" ({m.base})" if m.base != m.parent
                                                                            else ""))
    from tokenloom.loader.variants import TAGS

    print(f"\nvariants: NAME:TAG loads a model another way ({', '.join(':' + t for t in TAGS if t != 'latest')}); "
          "`tokenloom serve` without a model serves them all on demand")


def cmd_create(args):
    """`tokenloom create NAME -f Modelfile`: FROM a catalogue name, a created model or local weights (a path
    relative to the Modelfile's folder)."""
    from pathlib import Path

    from tokenloom.config import TokenloomError
    from tokenloom.loader.created import create
    from tokenloom.loader.modelfile import parse_modelfile

    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenloomError(f"cannot read {path}: {exc.strerror}") from None
    mf = parse_modelfile(text)
    relative = path.resolve().parent / Path(mf.from_).expanduser()
    from_ = str(relative) if not Path(mf.from_).is_absolute() and relative.exists() else mf.from_
    model = create(args.name, from_, system=mf.system, template=mf.template, parameters=mf.parameters,
                   messages=mf.messages, license=mf.license)
    print(f"created '{model.name}' from '{model.parent}'")


def cmd_cp(args):
    from tokenloom.loader.created import copy, create, load

    source = load(args.source)
    model = copy(source, args.destination) if source is not None else create(args.destination, args.source)
    print(f"copied '{args.source}' to '{model.name}'")


def cmd_rm(args):
    from tokenloom.config import TokenloomError
    from tokenloom.loader.created import delete
    from tokenloom.loader.sources import delete_cached

    for name in args.models:
        if not (delete(name) or delete_cached(name)):
            raise TokenloomError(f"model '{name}' not found (neither a created model nor a pulled catalogue model)")
        print(f"deleted '{name}'")


def cmd_show(args):
    from tokenloom.loader.inspect import describe_model

    for key, value in describe_model(args.model).items():
        if key == "chat template":
            print(f"{key}:\n{value}")
        else:
            print(f"{key:<18} {value}")
