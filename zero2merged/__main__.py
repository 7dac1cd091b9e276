"""``python -m zero2merged``: the same as the ``zero2merged`` command."""

from zero2merged.cli import main

main()
