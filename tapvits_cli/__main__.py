"""``python -m tapvits_cli`` is the same as the ``tapvits`` command."""

from tapvits_cli.cli.main import entry_point

entry_point()
