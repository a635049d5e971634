"""``tapvits validate FILE...``: check artifacts against the protocol, exit non-zero if any fails."""

from __future__ import annotations

import click

from tapvits_cli.cli.options import CURRENT, global_options
from tapvits_cli.cli.output import emit, error_line


@click.command("validate", short_help="Check artifacts against the protocol; non-zero exit on failure.")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@global_options
def command(paths: tuple[str, ...]) -> None:
    """Check each artifact against its kind's spec in protocol/.

    Prints "PATH: ok (KIND vN)" per valid file on stdout; the first failure is one
    line on stderr and sets the exit code (3 invalid, 4 incompatible).
    """
    from tapvits_cli.cli.stage_call import run_stage
    from tapvits_cli.stages import validate

    result = run_stage(validate)
    results, failure = result.results, result.failure
    if CURRENT.json:
        emit({"results": results})
    elif any(r["valid"] for r in results):
        emit(None, "\n".join(f"{r['path']}: ok ({r['kind']} v{r['version']})" for r in results if r["valid"]))
    if failure is not None:
        for r in results:
            if not r["valid"] and r["error"] != str(failure):
                click.echo(error_line(r["error"]), err=True)
        raise failure
