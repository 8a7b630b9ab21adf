"""``alignscope study``: base model → data → alignment arms → audits → compare → attribution →
curated re-alignment → report, in one resumable command.

Every step stores its result as a content-keyed artefact (``alignscope.store.RunDir``), so an
interrupted study rerun with the same config skips the finished steps and redoes only the rest;
``RUN/study.json`` is the index the report reads, rewritten atomically after every step.

Curation is the counterfactual check of attribution: retrain each arm's recipe with the same seed
after dropping the top-k attributed pairs, and (control) k random pairs, then re-audit the
attributed probe. ``fraction_removed = (m_aligned - m_curated) / (m_aligned - m_base)`` is the
share of the alignment-induced change that the dropped pairs were responsible for.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from alignscope.audit.runner import audit, available_probes, compare, parse_probe_names, write_comparison
from alignscope.errors import InputError
from alignscope.store import RunDir, atomic_write_json, atomic_write_parquet, file_hash, versions
from alignscope.study.config import StudyConfig

STUDY_FILE = "study.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StudyRecord:
    """``study.json``: the config, what each step produced (paths relative to RUN) and its timing."""

    def __init__(self, root: Path, config: StudyConfig, quick: bool, say: Callable[[str], None]) -> None:
        self.root = root
        self.say = say
        self.data: dict[str, Any] = {
            "config": config.model_dump(mode="json"), "quick": quick, "started_at": _now(), "finished_at": None,
            "versions": versions(), "models": {"base": config.model}, "stages": [], "audits": {}, "align": {},
            "comparisons": [],
        }
        self.total = 0
        self.count = 0

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root.resolve()))

    @contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        """Time one step, announce it, and record it (also when it fails, as ``failed``)."""
        self.count += 1
        self.say(f"study: [{self.count}/{self.total}] {name} …")
        entry: dict[str, Any] = {"name": name, "status": "running"}
        started = time.perf_counter()
        try:
            yield entry
        except BaseException:
            entry.update(status="failed", seconds=round(time.perf_counter() - started, 2))
            self.data["stages"].append(entry)
            self.save()
            raise
        entry["seconds"] = round(time.perf_counter() - started, 2)
        if entry["status"] == "running":
            entry["status"] = "done"
        self.data["stages"].append(entry)
        self.save()
        self.say(f"study: [{self.count}/{self.total}] {name}: {entry['status']} in {entry['seconds']:.1f} s")

    def save(self) -> None:
        atomic_write_json(self.root / STUDY_FILE, self.data)


def _check_probes(config: StudyConfig) -> list[str]:
    names = parse_probe_names(config.audit.probes)
    registry = available_probes()
    for name in names:
        if registry[name].requires_data and name not in config.audit.data:
            raise InputError(f"study config: probe {name} has no embedded data; add audit.data.{name}: PATH")
    for name, path in config.audit.data.items():
        if name not in names:
            raise InputError(f"study config: audit.data names probe {name!r}, which is not in audit.probes")
        if not Path(path).exists():
            raise InputError(f"study config: audit.data.{name}: {path} does not exist")
    if config.attribution is not None and config.attribution.probe not in names:
        raise InputError(f"study config: attribution.probe {config.attribution.probe!r} must also be in audit.probes")
    return names


# --------------------------------------------------------------------------- data


def make_data(engine: Any, config: StudyConfig, run: RunDir) -> tuple[list[Any], Path]:
    """Load or synthesise the preference pairs, plant the ground truth, store them as an artefact."""
    from alignscope.data.planting import is_canary, planting_info
    from alignscope.data.preferences import load_preferences, pairs_from_frame, pairs_to_frame

    settings = config.data
    source_key = (file_hash(Path(settings.source)) if settings.source and Path(settings.source).is_file()
                  else settings.source)
    inputs = {"stage": "data", "source": source_key or "synthesis", "model": engine.lm.fingerprint,
              "synthesis": settings.synthesis.model_dump() if settings.source is None else None,
              "plant": settings.plant.model_dump() if settings.plant else None, "seed": config.seed}
    if settings.canaries is not None:  # only when set, so the keys of data built without canaries stay valid
        inputs["canaries"] = settings.canaries.model_dump()
    found = run.find("data", inputs)
    if found is not None:
        return pairs_from_frame(pd.read_parquet(found.file("pairs.parquet"))), found.path
    stats: dict[str, Any] = {}
    if settings.source is None:
        from alignscope.data.synthesis import default_prompts, synthesise_pairs

        s = settings.synthesis
        prompts = default_prompts(harmful=s.harmful, seed=config.seed) if s.harmful is not None else None
        pairs = synthesise_pairs(engine, prompts, s.reward, n_pairs=s.n_pairs, seed=config.seed,
                                 max_new_tokens=s.max_new_tokens, temperature=s.temperature)
        stats["synthesis"] = pairs.stats
        pairs = list(pairs)
    else:
        pairs = load_preferences(settings.source)
    planted_with = inputs["plant"]
    if settings.plant is not None:
        from alignscope.data.planting import check_traits, default_contrast_groups, plant

        p = settings.plant
        contrast = (p.contrast_groups if p.contrast_groups is not None
                    else default_contrast_groups(p.target_group, p.control_group))
        pairs = plant(pairs, fraction=p.fraction, target_group=p.target_group, control_group=p.control_group,
                      seed=config.seed, traits=p.traits, contrast_groups=contrast)
        # the summary names what was planted, defaults resolved (the key keeps the config as written)
        planted_with = {**planted_with, "traits": list(check_traits(p.traits)), "contrast_groups": list(contrast)}
    if settings.canaries is not None:
        from alignscope.data.planting import plant_canaries

        c = settings.canaries
        pairs = plant_canaries(pairs, c.n, seed=config.seed, prefix=c.prefix, digits=c.digits, secrets=c.secrets)
    with run.build("data", inputs) as scratch:
        atomic_write_parquet(scratch / "pairs.parquet", pairs_to_frame(pairs))
        atomic_write_json(scratch / "summary.json", {
            "n_pairs": len(pairs), "n_planted": sum(p.planted for p in pairs),
            "n_contrast": sum(planting_info(p).get("role") == "contrast" for p in pairs),
            "n_canaries": sum(is_canary(p) for p in pairs), **stats,
            "source": settings.source or "synthesised from the base model", "plant": planted_with})
    # Train on what was stored (Parquet normalises meta), so a resumed study trains on identical pairs.
    path = run.path("data", inputs)
    return pairs_from_frame(pd.read_parquet(path / "pairs.parquet")), path


# --------------------------------------------------------------------------- models


def _engine(lm: Any, config: StudyConfig) -> Any:
    from alignscope.models import Engine

    return Engine(lm, batch_tokens=config.batch_tokens)


def _probe_options(config: StudyConfig, pairs: Sequence[Any], probe: str) -> dict[str, Any]:
    """What the planted data implies for ``probe`` (its group, its secret), then the user's audit.options."""
    return {**available_probes()[probe].options_for(pairs), **config.audit.options.get(probe, {})}


def _audit_model(lm: Any, config: StudyConfig, pairs: Sequence[Any], probes: Sequence[str], out: Path) -> None:
    data = {k: Path(v) for k, v in config.audit.data.items() if k in probes}
    audit(_engine(lm, config), probes, out, limit=config.audit.limit, data=data,
          options={name: _probe_options(config, pairs, name) for name in probes}, seed=config.seed)


def _metric_value(audit_dir: Path, probe: str, metric: str) -> float:
    from alignscope.audit.runner import audited_probes

    summary = json.loads(audited_probes(audit_dir)[probe].file("summary.json").read_text())
    return float(summary["metrics"][metric]["value"])


# --------------------------------------------------------------------------- the study


def run_study(config: StudyConfig, out: Path, *, quick: bool = False,
              say: Callable[[str], None] | None = None) -> Path:
    """Run (or resume) a study into ``out``; returns the path of the HTML report."""
    from alignscope.align.stage import train_recipe
    from alignscope.models import load

    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    probes = _check_probes(config)
    arm_stages = {arm: config.stages(arm) for arm in config.arms}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = RunDir(out)
    record = StudyRecord(out, config, quick, say)
    curation_runs = (len(config.curation.ks or [0]) * (1 + len(config.curation.random_seeds))
                     if config.curation else 0)
    # data, audit base, align + audit per arm, compare, attribute, curation runs, report
    record.total = 2 + 2 * len(config.arms) + 1 + bool(config.attribution) + curation_runs + 1
    started = time.perf_counter()

    base = load(config.model, dtype=config.dtype)
    base_engine = _engine(base, config)
    record.data["models"]["base_fingerprint"] = base.fingerprint
    with record.step("data") as entry:
        pairs, data_dir = make_data(base_engine, config, run)
        entry["artefact"] = record.data["data"] = record.relative(data_dir)
    with record.step("audit base") as entry:
        _audit_model(base, config, pairs, probes, out / "audits" / "base")
        entry["artefact"] = record.data["audits"]["base"] = "audits/base"
    del base_engine, base  # one model in memory at a time
    gc.collect()

    finals, aligned = {}, {}
    for arm, stages in arm_stages.items():
        with record.step(f"align {arm}") as entry:
            results = train_recipe(config.model, stages, pairs, out)
            finals[arm], aligned[arm] = results[-1], results
            entry["status"] = "cached" if all(r.cached for r in results) else "done"
            entry["artefact"] = record.data["align"][arm] = record.relative(results[-1].path)
            entry["stages"] = [record.relative(r.path) for r in results]
        with record.step(f"audit {arm}") as entry:
            lm = finals[arm].load(dtype=config.dtype)
            _audit_model(lm, config, pairs, probes, out / "audits" / arm)
            entry["artefact"] = record.data["audits"][arm] = f"audits/{arm}"
            del lm
            gc.collect()

    with record.step("compare") as entry:
        for arm in config.arms:
            runs = [out / "audits" / "base", out / "audits" / arm]
            path = write_comparison(compare(*runs, seed=config.seed), out, runs)
            record.data["comparisons"].append({"a": "base", "b": arm, "path": record.relative(path)})
        entry["artefact"] = "compare"

    if config.attribution is not None:
        with record.step("attribute") as entry:
            artefact = _attribute(config, finals[config.attributed_arm].path, out)
            entry["artefact"] = record.data["attribution"] = record.relative(artefact)
        if config.curation is not None:
            arm = config.attributed_arm
            curve = _curate(config, pairs, arm_stages[arm], aligned[arm], out, record, train_recipe)
            record.data["curation"] = record.relative(curve)

    with record.step("report") as entry:
        record.data["finished_at"] = _now()
        record.data["seconds"] = round(time.perf_counter() - started, 1)
        record.save()
        report = _report(out)
        entry["artefact"] = record.relative(report)
    return report


def _attribute(config: StudyConfig, stage_dir: Path, out: Path) -> Path:
    from alignscope.attribute import attribute

    settings = config.attribution
    assert settings is not None
    # By name: attribute() builds the probe from what the stage's pairs planted, then the user's options.
    artefact = attribute(out, stage_dir, settings.probe, probe_options=config.audit.options.get(settings.probe),
                         metric=settings.metric, methods=config.attribution_methods(),
                         project_dim=settings.project_dim, limit=config.audit.limit, seed=config.seed,
                         layers=settings.layers)
    return artefact.path


def _curate(config: StudyConfig, pairs: list[Any], stages: list[Any], aligned: list[Any], out: Path,
            record: StudyRecord, train_recipe: Callable[..., Any]) -> Path:
    """Retrain without the top-k attributed pairs and without k random ones; re-audit; store the curve."""
    from alignscope.attribute.core import explained_metric
    from alignscope.attribute.validation import default_scores, predicted_fraction_removed

    assert config.attribution is not None and config.curation is not None
    run = RunDir(out)
    probe = config.attribution.probe
    metric = explained_metric(available_probes()[probe], config.attribution.metric)
    scores = out / record.data["attribution"] / "scores.parquet"
    estimator, score_column = default_scores(scores.parent)
    n_planted = int(sum(p.planted for p in pairs))
    truth, truth_ids = _ground_truth(scores.parent)
    ks = config.curation.ks or [max(len(truth_ids) or n_planted, 1)]  # as many as the measurement's ground truth
    truth_column = f"{truth}_dropped" if truth and truth != "planted" else None
    arm = config.attributed_arm
    base_value = _metric_value(out / "audits" / "base", probe, metric)
    aligned_value = _metric_value(out / "audits" / arm, probe, metric)
    increase = aligned_value - base_value
    planted_ids = {str(p.id) for p in pairs if p.planted}
    zero_loss = config.curation.retrain == "zero_loss"
    same_steps = config.curation.same_steps and not zero_loss
    if same_steps:
        stages = _same_steps(stages, aligned)
    rows = []
    for k in ks:
        if k >= len(pairs):
            raise InputError(f"study config: curation.ks contains {k}, but the data has only {len(pairs)} pairs")
        for arm_kind, seed, kept, dropped in _drops(pairs, scores, k, config.curation.random_seeds):
            label = f"curated_{arm_kind}_k{k}" + (f"_s{seed}" if seed is not None else "")
            with record.step(f"curate {label}") as entry:
                if zero_loss:
                    result = train_recipe(config.model, _zeroed(stages, dropped), pairs, out)[-1]
                else:
                    result = train_recipe(config.model, stages, kept, out)[-1]
                lm = result.load(dtype=config.dtype)
                _audit_model(lm, config, pairs, [probe], out / "audits" / label)
                del lm
                gc.collect()
                record.data["audits"][label] = f"audits/{label}"
                value = _metric_value(out / "audits" / label, probe, metric)
                table = compare(out / "audits" / arm, out / "audits" / label, seed=config.seed)
                row = table[(table["probe"] == probe) & (table["metric"] == metric)].iloc[0]
                predicted = None if score_column is None else predicted_fraction_removed(
                    score_column, dropped, increase=increase, same_steps=same_steps)
                rows.append({"k": k, "arm": arm_kind, "random_seed": seed, "label": label, "probe": probe,
                             "metric": metric, "value": value, "change": value - aligned_value,
                             "change_ci_low": float(row["ci_low"]), "change_ci_high": float(row["ci_high"]),
                             "change_p": float(row["p_value"]),
                             "fraction_of_increase_removed": (aligned_value - value) / increase if increase else None,
                             "predicted_fraction_removed": predicted,
                             "planted_dropped": len(planted_ids & set(dropped)), "stage": record.relative(result.path),
                             **({truth_column: len(truth_ids & set(dropped))} if truth_column else {})})
                entry["artefact"] = f"audits/{label}"
    curve = pd.DataFrame(rows)
    inputs = {"stage": "curation", "attribution": record.data["attribution"], "rows": rows}
    with run.build("curation", inputs) as scratch:
        atomic_write_parquet(scratch / "curve.parquet", curve)
        atomic_write_json(scratch / "summary.json", {
            "probe": probe, "metric": metric, "base_value": base_value, "aligned_value": aligned_value,
            "increase": increase, "n_planted": n_planted, "ks": ks, "ground_truth": truth,
            "definition": "fraction_of_increase_removed = (aligned - curated) / (aligned - base); each curated "
                          "model retrains the same recipe and seed " + RETRAINED[
                              "zero_loss" if zero_loss else "same_steps" if same_steps else "epochs"],
            "retrain": config.curation.retrain,
            "same_steps": same_steps,
            "predicted_by": estimator,
            "prediction": PREDICTION_DEFINITION,
            "random_control": _random_control(rows, config.curation.retrain),
            "rows": rows})
    return run.path("curation", inputs)


def _ground_truth(attribution: Path) -> tuple[str | None, set[str]]:
    """The attribution's ground truth (e.g. ``planted``, ``canary``) and its pair ids, as it stored them:
    the probe decided once, in the attribution, so curation reads that rather than asking again."""
    truth = json.loads((attribution / "summary.json").read_text()).get("ground_truth")
    if not truth:
        return None, set()
    table = pd.read_parquet(attribution / "scores.parquet", columns=["pair_id", truth])
    return truth, set(table.loc[table[truth].astype(bool), "pair_id"].astype(str))


def _drops(pairs: list[Any], scores: Path, k: int, random_seeds: Sequence[int]
           ) -> list[tuple[str, int | None, list[Any], list[str]]]:
    """(arm, random seed, kept pairs, dropped ids): the top-k attributed drop, then one random drop per seed."""
    from alignscope.attribute import curate

    top = curate(pairs, scores, drop_top=k)
    drops: list[tuple[str, int | None, list[Any], list[str]]] = [("attributed", None, top.kept, list(top.dropped))]
    for seed in random_seeds:
        control = curate(pairs, scores, drop_top=k, random_k=k, seed=seed)
        assert control.control_kept is not None and control.control_dropped is not None
        drops.append(("random", seed, control.control_kept, list(control.control_dropped)))
    return drops


PREDICTION_DEFINITION = ("predicted_fraction_removed = the share an additive model predicts: the aligned increase "
                         "split over the training pairs in proportion to the default estimator's scores "
                         "(predicted_by); with same_steps the kept pairs' share is scaled by n / n_kept, as each is "
                         "seen that much more often")

#: How a curated model was retrained, per mode, as the summary's definition words it.
RETRAINED = {
    "zero_loss": "on every pair, in the same order and batches, with the dropped pairs' loss multiplied by 0",
    "same_steps": "without the dropped pairs, for as many optimizer steps as the original stage ran",
    "epochs": "without the dropped pairs, for the recipe's epochs over the smaller data",
}

#: The spread one random draw showed on the default study (eight draws each, BENCHMARKS.md sessions
#: 10 and 12), per retrain mode: read a single draw with it in mind.
ONE_DRAW_WARNING = {
    retrain: f"one random draw: on the default study, draws of the same size removed between {spread} of the "
             "increase, so add curation.random_seeds before reading the control"
    for retrain, spread in (("drop", "-45 % and 42 %"), ("zero_loss", "15 % and 67 %"))}


def _random_control(rows: list[dict[str, Any]], retrain: str = "drop") -> dict[str, dict[str, Any]]:
    """Per k, the random arm summarised over its draws: what the attributed drop is compared against.

    Why: one random retrain is a noisy control (retraining on a different data order moves the
    metric by itself), so the summary gives the mean and range over draws, and says so when there
    is only one. ``rank_p_value`` is the exact rank test of the attributed drop against the draws:
    (1 + draws removing at least as much) / (draws + 1), the chance a drop exchangeable with the
    random ones would rank as high. Its floor is 1/(draws + 1), so it takes 19 draws to reach 0.05.
    """
    def removed(k: int, arm: str) -> list[float]:
        return [row["fraction_of_increase_removed"] for row in rows
                if row["k"] == k and row["arm"] == arm and row["fraction_of_increase_removed"] is not None]

    out: dict[str, dict[str, Any]] = {}
    for k in dict.fromkeys(row["k"] for row in rows):
        shares = removed(k, "random")
        if not shares:
            continue
        entry: dict[str, Any] = {"draws": len(shares), "mean_fraction_removed": statistics.fmean(shares),
                                 "min_fraction_removed": min(shares), "max_fraction_removed": max(shares)}
        predicted = [row.get("predicted_fraction_removed") for row in rows if row["k"] == k and row["arm"] == "random"]
        if predicted and None not in predicted:
            entry["mean_predicted_fraction_removed"] = statistics.fmean(predicted)
        attributed = removed(k, "attributed")
        if attributed:
            entry["attributed_fraction_removed"] = attributed[0]
            entry["rank_p_value"] = (1 + sum(share >= attributed[0] for share in shares)) / (len(shares) + 1)
        if len(shares) == 1:
            entry["warning"] = ONE_DRAW_WARNING[retrain]
        out[f"k{k}"] = entry
    return out


def _same_steps(stages: list[Any], aligned: list[Any]) -> list[Any]:
    """The recipe with each stage's ``max_steps`` set to the steps its ``aligned`` result ran on the full data.

    Why: with the recipe's epochs, dropping k of n pairs also drops k/n of the optimizer steps, and
    a planted effect that needs two epochs to appear shrinks with *any* drop: on the default study
    three random drops of 32 of 128 pairs removed 77 %, 11 % and 70 % of the increase that way
    (BENCHMARKS.md). Fixed steps keep the training budget and change only the data.
    """
    return [stage.model_copy(update={"max_steps": int(result.summary["steps"])})
            for stage, result in zip(stages, aligned)]


def _zeroed(stages: list[Any], dropped: Sequence[str]) -> list[Any]:
    """The recipe with the dropped pairs' loss zeroed in every stage that trains on the study's pairs
    (a stage with its own ``data:`` is left alone, as the drop leaves it alone). Validated again: the
    config checked that those stages support it, so this only fails on a bug."""
    return [stage if stage.data is not None else stage.with_zero_loss(dropped) for stage in stages]


def _report(out: Path) -> Path:
    from alignscope.report import build_report

    return Path(build_report(out).html)
