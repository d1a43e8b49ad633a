"""``python -m inheritune`` (and ``torchrun -m inheritune``) enter the CLI."""

from inheritune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
