"""``python -m denseclip_fast``: the ``denseclip-fast`` command (denseclip_fast.cli)."""

from .cli import run

if __name__ == "__main__":
    run()
