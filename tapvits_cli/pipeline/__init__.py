"""Whole pipelines: recipes validated, unrolled into subcommand steps, run with skipping.

``recipe`` checks a recipe document, ``steps`` turns it into subcommand invocations,
``runner`` keys them (what makes a step unchanged), ``schedule`` carries them out
on an executor (serial, local processes, Ray, Slurm), ``progress`` follows how far it
is, ``summary`` condenses the results. File access goes through ``artifacts.run_directory``; the CLI is ``cli/run.py``.
"""
