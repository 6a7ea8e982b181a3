"""`tokenloom pull`, `list` and `show`: the model catalogue and what is cached."""
from __future__ import annotations


def cmd_pull(args):
    from tokenloom.loader.sources import pull

    path = pull(args.model)
    print(f"{args.model}: {path} ({path.stat().st_size / 1e6:.1f} MB)")


def cmd_list(args):
    from tokenloom.loader.sources import CATALOGUE, list_models

    cached = {name: (path, size) for name, path, size in list_models()}
    print(f"{'NAME':<20} {'SIZE':>10}  {'STATUS':<12} DESCRIPTION")
    for name, entry in CATALOGUE.items():
        size = f"{cached[name][1] / 1e6:.1f} MB" if name in cached else "-"
        print(f"{name:<20} {size:>10}  {'downloaded' if name in cached else 'not pulled':<12} {entry.description}")


def cmd_show(args):
    from tokenloom.loader.inspect import describe_model

    for key, value in describe_model(args.model).items():
        if key == "chat template":
            print(f"{key}:\n{value}")
        else:
            print(f"{key:<18} {value}")
