"""Dataset loader of the tokenloom_mc lm-eval tasks: the JSONL items next to this folder, offline."""
from pathlib import Path

ITEMS = Path(__file__).resolve().parent.parent / "mc_items.jsonl"


def load_mc_items(**_metadata):
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(ITEMS)})
