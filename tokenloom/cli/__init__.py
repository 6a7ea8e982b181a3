"""The `tokenloom` command line (see main.py)."""
