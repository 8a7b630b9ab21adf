"""The ``alignscope`` command line. Each subcommand is a thin call into a package below.

Bad input never shows a traceback: ``InputError`` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

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
OptionOpt = Annotated[Optional[list[str]], typer.Option(
    help="PROBE.KEY=VALUE: a probe option (VALUE as JSON, else text), e.g. planted_bias.target_group=lawyers; "
         "repeatable.")]


@models_app.command("list")
def models_list() -> None:
    """Show built-in models and whether each is installed."""
    from alignscope.models.builtin import BUILTINS, DEFAULT_MODEL, converted_dir

    for name, builtin in BUILTINS.items():
        state = "installed" if builtin.installed else f"not installed ({builtin.install})"
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
    with _no_empty_run_dir(out):
        path = score_to_run(engine, reqs, ids, requests, out)
    if path is not None:
        typer.echo(f"scored {len(reqs)} requests in {time.perf_counter() - started:.1f}s -> {path}")


probes_app = typer.Typer(help="Bias and trust probes.", no_args_is_help=True)
app.add_typer(probes_app, name="probes")


@probes_app.command("list")
def probes_list() -> None:
    """Show every probe with its metrics (direction and ideal value), accepted data formats and the
    options `--option PROBE.KEY=VALUE` can set."""
    from alignscope.audit.runner import available_probes

    for name, probe in available_probes().items():
        typer.echo(f"{name}: {probe.description}")
        typer.echo(f"    data: {probe.data_formats}")
        typer.echo(f"    options: {', '.join(probe.option_names()) or 'none'}")
        for m in probe.metrics:
            typer.echo(f"    - {m.name} [{m.unit}] {m.direction.replace('_', ' ')}, ideal {m.ideal:g}")


@app.command("audit")
def audit_cmd(
    out: OutOpt,
    model: ModelOpt = "smollm2-135m",
    adapter: AdapterOpt = None,
    probes: Annotated[str, typer.Option(
        help="Comma-separated probe names (see `probes list`), or 'all' (every probe with embedded data).")] = "all",
    limit: Annotated[Optional[int], typer.Option(help="Items per probe (seeded subset) for quick runs.")] = None,
    data: Annotated[Optional[list[str]], typer.Option(help="PROBE=PATH: run a probe on your own file.")] = None,
    option: OptionOpt = None,
    seed: int = 0,
    dtype: DtypeOpt = "auto",
    batch_tokens: Annotated[int, typer.Option(help="Token budget per forward pass.")] = 4096,
) -> None:
    """Audit one model on bias and trust probes; per-item scores go to the run directory."""
    from alignscope.audit.runner import (audit, available_probes, parse_data_overrides, parse_option_overrides,
                                         parse_probe_names)
    from alignscope.models import Engine, load

    defaults = [n for n, p in available_probes().items() if not p.requires_data]
    names = parse_probe_names(defaults if probes == "all" else probes)
    overrides = parse_data_overrides(data or [], names)
    options = parse_option_overrides(option or [], names)
    if limit is not None and limit < 1:
        raise InputError(f"--limit {limit}: must be a positive number of items")
    if batch_tokens < 1:
        raise InputError(f"--batch-tokens {batch_tokens}: must be a positive number of tokens")
    _preflight_probe_data(names, overrides, options, limit, seed)
    lm = load(model, adapter=adapter, dtype=dtype)
    engine = Engine(lm, batch_tokens=batch_tokens)
    with _no_empty_run_dir(out):
        done = audit(engine, names, out, limit=limit, data=overrides, options=options, seed=seed)
    _print_audit(done)


def _preflight_probe_data(names: list[str], overrides: dict[str, Path], options: dict[str, dict[str, Any]],
                          limit: Optional[int], seed: int) -> None:
    """Read every user-supplied probe file before the model loads.

    A typo on line 3 of a data file should cost a second, not a model load plus the probes that
    run before it; the files are small, so reading them twice is the cheaper trade.
    """
    from alignscope.audit.runner import available_probes

    registry = available_probes()
    for name in names:
        probe = registry[name](**options.get(name, {}))  # a bad option fails here, before the model loads
        if probe.requires_data and name not in overrides:
            raise InputError(f"probe {name} has no embedded data; pass --data {name}=PATH ({probe.data_formats})")
        if name in overrides:
            probe.load_items(overrides[name], limit=limit, seed=seed)


def _print_audit(done: dict) -> None:
    import json

    for name, artefact in done.items():
        summary = json.loads(artefact.file("summary.json").read_text())
        values = ", ".join(f"{k}={v['value']:.3g}{v['unit'] if v['unit'] == '%' else ''}"
                           for k, v in summary["metrics"].items())
        typer.echo(f"{name} ({summary['n_items']} items, {summary['seconds']}s): {values}")


@app.command("compare")
def compare_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Audited run directories: the first is the baseline.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to store the comparison.")] = None,
    intersect: Annotated[bool, typer.Option(help="Compare on the items both runs share.")] = False,
    seed: int = 0,
) -> None:
    """Per metric: delta, paired bootstrap CI, paired test, Holm-corrected p, effect size, verdict."""
    from alignscope.audit.runner import compare, write_comparison

    if len(runs) < 2:
        raise InputError("compare needs at least two run directories (baseline first)")
    for other in runs[1:]:
        table = compare(runs[0], other, intersect=intersect, seed=seed)
        typer.echo(f"{runs[0]} -> {other}")
        for r in table.itertuples():
            star = "*" if r.significant else " "
            typer.echo(f"  {star} {r.probe}/{r.metric}: {r.value_a:.4g} -> {r.value_b:.4g} "
                       f"(delta {r.delta:+.4g} [{r.ci_low:+.4g}, {r.ci_high:+.4g}], p_holm {r.p_holm:.3g}, "
                       f"{r.verdict})")
        if out is not None:
            path = write_comparison(table, out / other.name if len(runs) > 2 else out, [runs[0], other])
            typer.echo(f"  -> {path}")


RunArg = Annotated[Path, typer.Argument(help="Run directory of `alignscope study` (or of `alignscope audit`).")]


@app.command("report")
def report_cmd(
    run: RunArg,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Directory for report.html/.json "
                                                "(default: the run directory).")] = None,
) -> None:
    """Rebuild the static HTML report and report.json from a run's stored artefacts."""
    from alignscope.report import build_report

    paths = build_report(run, out)
    typer.echo(f"report -> {paths.html}\nvalues -> {paths.json}")


@app.command("view")
def view_cmd(
    run: RunArg,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: any free port).")] = 8000,
    rebuild: Annotated[bool, typer.Option(help="Rebuild the report first even if it exists.")] = False,
) -> None:
    """Serve a run's report on 127.0.0.1 only (built first if missing); Ctrl-C stops."""
    from alignscope.report import REPORT_HTML, build_report
    from alignscope.report.serve import make_server, url

    if not 0 <= port <= 65535:
        raise InputError(f"--port {port}: must be between 0 and 65535")
    html = Path(run) / REPORT_HTML
    if rebuild or not html.is_file():
        html = build_report(run).html
    server = make_server(html, port)
    typer.echo(f"serving {html} at {url(server)} (127.0.0.1 only; Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("stopped")
    finally:
        server.server_close()


@app.command("align")
def align_cmd(
    out: OutOpt,
    data: Annotated[Optional[str], typer.Option(
        help="Preference data: .jsonl/.json/.csv/.parquet (HH-RLHF, TRL or UltraFeedback style) or a hub id.")] = None,
    model: ModelOpt = "smollm2-135m",
    method: Annotated[Optional[str], typer.Option(
        help="sft, dpo, ipo, orpo, kto, simpo or rloo (optional when --config lists stages).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="Stage YAML (one stage, or `stages: [...]`).")] = None,
    init_adapter: Annotated[Optional[Path], typer.Option(help="Adapter to start from (merged first).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Override the steps of every stage.")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Override the epochs of every stage.")] = None,
    seed: int = 0,
) -> None:
    """Align a model with a TRL recipe (LoRA by default); multi-stage recipes chain merged stages."""
    from alignscope.align.stage import align_command

    if method is None and config is None:
        raise InputError("align needs --method (sft, dpo, ipo, orpo, kto, simpo, rloo) or a --config with stages")
    with _no_empty_run_dir(out):
        path = align_command(model, method, data, out, config=config, init_adapter=init_adapter,
                             max_steps=max_steps, epochs=epochs, seed=seed)
    typer.echo(f"aligned -> {path}")


@app.command("study")
def study_cmd(
    config: Annotated[Optional[Path], typer.Argument(
        help="Study YAML (examples in configs/); omitted: the embedded default study.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write into.")] = Path("runs/default"),
    quick: Annotated[bool, typer.Option("--quick", help="Smoke run: a few pairs, steps and items.")] = False,
) -> None:
    """Base model → preference data → alignment → audits → compare → attribution → curation → report."""
    from alignscope.study import load_study_config, quick as quick_config, run_study

    settings = load_study_config(config)
    if quick:
        settings = quick_config(settings)
    with _no_empty_run_dir(out):
        report = run_study(settings, out, quick=quick)
    typer.echo(f"report -> {report}")


@app.command("import-stage")
def import_stage_cmd(
    out: OutOpt,
    data: Annotated[str, typer.Option(help="The preference pairs it was trained on (.jsonl/.json/.csv/.parquet "
                                      "or a hub id).")],
    adapter: Annotated[Optional[Path], typer.Option(help="PEFT LoRA adapter directory trained outside alignscope "
                                                    "(adapter_config.json + adapter_model.safetensors).")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(
        help="Instead of --adapter: a fully fine-tuned model directory (config.json + safetensors weights); "
             "--model is then its starting point and DPO/KTO reference.")] = None,
    model: ModelOpt = "smollm2-135m",
    method: Annotated[Optional[str], typer.Option(
        help="How it was trained: sft, dpo, ipo, orpo, kto or simpo (optional when --config names it).")] = None,
    config: Annotated[Optional[Path], typer.Option(
        help="One-stage YAML with the training objective's settings (beta, loss_type, max_length, ...).")] = None,
    snapshot: Annotated[Optional[list[Path]], typer.Option(
        help="A TRL checkpoint-<step> directory of the same LoRA run, kept for TracIn (--method tracin); "
             "repeatable.")] = None,
) -> None:
    """Make an adapter or fully fine-tuned model trained elsewhere (e.g. by your own TRL script) a stage of
    RUN, for attribute and curate."""
    from alignscope.align.imported import import_stage

    with _no_empty_run_dir(out):
        result = import_stage(model, adapter, data, out, method=method, config=config, checkpoint=checkpoint,
                              snapshots=snapshot or ())
    typer.echo(f"imported -> {result.path}")
    typer.echo(f"attribute it with: alignscope attribute --run {out} --stage {result.key} --probe PROBE")


@app.command("attribute")
def attribute_cmd(
    run: Annotated[Path, typer.Option(help="Run directory holding the stage (and its reference cache).")],
    stage: Annotated[str, typer.Option(help="Stage directory, or its key under RUN/align/.")],
    probe: Annotated[str, typer.Option(help="Probe with a differentiable measurement (e.g. planted_bias).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory to write the attribution "
                                                "into (default: --run).")] = None,
    metric: Annotated[Optional[str], typer.Option(help="Probe metric being explained (default: its first).")] = None,
    method: Annotated[Optional[list[str]], typer.Option(
        help="gradsim, tracin, datainf, ekfac_onepass (EK-FAC on the collection pass), ekfac or kfac (through "
             "kronfluence), or all; comma-separated or repeatable "
             "(default: gradsim and datainf).")] = None,
    project_dim: Annotated[Optional[int], typer.Option(help="Randomly project gradients to K dims (default: exact "
                                                       "for LoRA stages, 1048576 for fully fine-tuned ones).")] = None,
    layers: Annotated[Optional[str], typer.Option(
        help="Which transformer blocks' LoRA weights the gradients cover: all, last:N or last:P% "
             "(default: last:50%, the later half).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Probe items (seeded subset) for quick runs.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Training pairs, for a stage without pairs.parquet.")] = None,
    seed: int = 0,
    lds: Annotated[int, typer.Option(help="Also validate by retraining on this many random subsets (linear "
                                     "datamodeling score; slow: one training each). 0: off.")] = 0,
    lds_fraction: Annotated[float, typer.Option(help="Share of the pairs in each LDS subset.")] = 0.5,
    before: Annotated[Optional[Path], typer.Option(help="Generation probes: audit run directory of the model "
                                                   "before alignment (with --after: pseudo-pairs of its outputs).")]
    = None,
    after: Annotated[Optional[Path], typer.Option(help="Generation probes: audit run directory of the aligned "
                                                  "model.")] = None,
    option: OptionOpt = None,
) -> None:
    """Rank a stage's training pairs by how much each moved a probe's metric (positive = towards worse)."""
    from alignscope.attribute import attribute
    from alignscope.attribute.core import DEFAULT_METHODS

    if not (Path(run) / "align").is_dir() and not (Path(stage) / "summary.json").exists():
        raise InputError(f"--run {run}: no align/ stages there; pass the run directory of `alignscope align`")
    if lds:
        from alignscope.attribute.validation import check_lds_settings

        check_lds_settings(lds, lds_fraction)  # before the attribution, not after it
    if (before is None) != (after is None):
        raise InputError("--before and --after go together: the audit runs of the model before and after alignment")
    from alignscope.audit.runner import parse_option_overrides

    options = parse_option_overrides(option or [], [probe]).get(probe)
    if options and before is not None:
        raise InputError("--option does not apply with --before/--after: the probe runs with the options its audits "
                         "stored")
    artefact = attribute(run, stage, probe, metric=metric, methods=method or list(DEFAULT_METHODS),
                         probe_options=options, project_dim=project_dim, limit=limit, seed=seed, data=data, out=out,
                         layers=layers, pseudo_pairs=(before, after) if before is not None and after is not None else None)
    summary = json.loads(artefact.file("summary.json").read_text())
    default = summary["default_estimator"]
    typer.echo(f"attribution -> {artefact.path}")
    typer.echo(f"default estimator: {default}; {summary['sign_convention']}")
    for name, row in (summary.get("planted") or {}).get("estimators", {}).items():
        auc, recall = row["auc"], row["recall_at_k"]
        typer.echo(f"  {name:16s} planted AUC {auc:.3f}  recall@{summary['planted']['k']} {recall:.2f}")
    truth = summary.get("ground_truth")
    if summary.get("planted") and truth != "planted":
        typer.echo("  (the planted pairs were planted to move planted_bias: for this measurement their AUC only "
                   "shows where they rank, it is not a check of the attribution)")
    if truth and truth != "planted":
        for name, row in summary[truth]["estimators"].items():
            typer.echo(f"  {name:16s} {truth} AUC {row['auc']:.3f}  recall@{summary[truth]['k']} "
                       f"{row['recall_at_k']:.2f}  (ground truth for this measurement)")
    if lds:
        from alignscope.attribute.validation import linear_datamodeling_score

        checked = linear_datamodeling_score(out or run, artefact.path, subsets=lds, fraction=lds_fraction, seed=seed)
        result = json.loads(checked.file("summary.json").read_text())
        typer.echo(f"LDS over {lds} retrained subsets -> {checked.path}")
        for name, value in result["lds"].items():
            typer.echo(f"  {name:16s} LDS {'n/a (constant)' if value is None else f'{value:+.3f}'}")


@app.command("curate")
def curate_cmd(
    run: Annotated[Path, typer.Option(help="Run directory holding the attribution.")],
    attribution: Annotated[str, typer.Option(help="Attribution directory, or its key under RUN/attribution/.")],
    drop_top: Annotated[int, typer.Option(help="Drop this many top-ranked pairs.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the kept pairs (.jsonl or .parquet), "
                                      "or with --zero-loss the stage YAML (.yaml).")],
    random: Annotated[bool, typer.Option("--random", help="Control: drop as many random pairs instead.")] = False,
    zero_loss: Annotated[bool, typer.Option("--zero-loss", help="Write the stage's config with the dropped pairs "
                                            "in zero_loss_pairs instead: retraining it keeps every pair in its "
                                            "batch and gives the dropped ones no gradient.")] = False,
    seed: int = 0,
) -> None:
    """Write the training pairs without the top-k attributed ones (or, with --random, k random ones)."""
    from alignscope.attribute import curate
    from alignscope.attribute.core import attribution_stage, stage_pairs
    from alignscope.attribute.validation import default_scores, predicted_fraction_removed

    path, stage = attribution_stage(run, attribution)
    pairs = stage_pairs(stage)
    if zero_loss and out.suffix not in (".yaml", ".yml"):
        raise InputError(f"--out {out}: with --zero-loss the output is a stage YAML; name it .yaml")
    done = curate(pairs, path, drop_top=drop_top, random_k=drop_top if random else None, seed=seed)
    dropped = done.control_dropped if random else done.dropped
    assert dropped is not None
    which = f"{'random' if random else 'top-attributed'} {drop_top}"
    if zero_loss:
        _write_zero_loss_stage(stage, dropped, out)
        typer.echo(f"{which} of {len(pairs)} pairs zeroed -> {out}\nretrain: alignscope align --model "
                   f"{stage.start_model} --config {out} --data {stage.path / 'pairs.parquet'} --out RUN")
    else:
        from alignscope.data.preferences import write_preferences

        kept = done.control_kept if random else done.kept
        assert kept is not None
        write_preferences(kept, out)
        typer.echo(f"kept {len(kept)} of {len(pairs)} pairs ({which} dropped) -> {out}")
    estimator, scores = default_scores(path)
    if scores is not None:
        total = float(scores.sum())  # the change the scores explain, in their own units
        shares = [predicted_fraction_removed(scores, dropped, increase=total, same_steps=same)
                  for same in (False, True)]
        if shares[0] is not None and zero_loss:  # same steps, same batches: only the dropped terms go
            typer.echo(f"if pair effects add up, retraining with their loss zeroed removes {shares[0]:.0%} of the "
                       f"change the {estimator} scores explain")
        elif None not in shares:
            typer.echo(f"if pair effects add up, retraining without them removes {shares[0]:.0%} of the change the "
                       f"{estimator} scores explain ({shares[1]:.0%} for the same number of optimizer steps)")


def _write_zero_loss_stage(stage: Any, dropped: list[str], out: Path) -> None:
    """The stage's config, as YAML ``align --config`` reads, with ``zero_loss_pairs`` = the dropped ids."""
    import yaml

    from alignscope.attribute.core import zero_loss_stage
    from alignscope.store import atomic_write_text

    config = zero_loss_stage(stage, dropped).model_dump(mode="json", exclude_defaults=True)
    atomic_write_text(out, yaml.safe_dump({"method": config.pop("method", stage.method), **config}, sort_keys=False))


@contextlib.contextmanager
def _no_empty_run_dir(out: Path) -> Iterator[None]:
    """If a command fails on bad input, remove the run directory it created unless it already
    holds finished artefacts (those stay: a rerun resumes from them)."""
    existed = Path(out).exists()
    try:
        yield
    except InputError:
        if not existed and Path(out).is_dir() and not (Path(out) / "manifest.json").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every user error is one line on stderr and exit code 2.

    Typer runs in non-standalone mode so that its usage errors (unknown option, missing value, a
    value of the wrong type) come back to us as exceptions instead of a multi-line box: scripts and
    users then see the same ``alignscope: error: ...`` shape for every bad input. ``argv`` lets
    tests call the real entry point in-process.
    """
    import warnings

    from typer._click import exceptions as click_errors

    # Deprecation notices between our dependencies (peft calling a renamed transformers method)
    # are for their developers; on a user's terminal they bury the one line that matters.
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|peft|trl|accelerate|datasets)\b")
    try:
        code = app(args=argv, prog_name="alignscope", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:  # `alignscope` / `alignscope models` alone: show help
        if exc.ctx is not None:
            exc.ctx.get_help()  # Typer prints the rich help itself
        sys.exit(2)
    except click_errors.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx is not None else "alignscope"
        message = " ".join(exc.format_message().split()).rstrip(".")
        typer.echo(f"alignscope: error: {command}: {message}; see `{command} --help`", err=True)
        sys.exit(2)
    except click_errors.ClickException as exc:
        typer.echo(f"alignscope: error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(exc.exit_code)
    except InputError as exc:
        typer.echo(f"alignscope: error: {' '.join(str(exc).split())}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        code = 130
    if code == 130:  # Typer turns Ctrl-C into exit code 130
        typer.echo("alignscope: interrupted; rerun the same command to resume", err=True)
    sys.exit(code if isinstance(code, int) else 0)

if __name__ == "__main__":
    main()
