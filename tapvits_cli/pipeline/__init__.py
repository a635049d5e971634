"""Whole pipelines: recipes validated, unrolled into subcommand steps, run with skipping.

``recipe`` checks a recipe document, ``steps`` turns it into subcommand invocations,
``runner`` carries them out (skipping unchanged ones), ``summary`` condenses the
results. File access goes through ``artifacts.run_directory``; the CLI is ``cli/run.py``.
"""
