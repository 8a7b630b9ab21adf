"""End-to-end study runs: the tiny model (fast, every step) and `study --quick` on the real SmolLM2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from alignscope.cli import main
from alignscope.study import StudyConfig, quick, run_study

REPO = Path(__file__).resolve().parents[1]


def tiny_study(model_dir: Path) -> StudyConfig:
    return quick(StudyConfig.model_validate({"model": str(model_dir), "seed": 3}))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("study")
    run_study(tiny_study(tiny_model_dir), out, quick=True, say=lambda _: None)
    return out


def test_study_writes_every_step(tiny_run: Path) -> None:
    record = json.loads((tiny_run / "study.json").read_text())
    names = [s["name"] for s in record["stages"]]
    assert names[:4] == ["data", "audit base", "align dpo", "audit dpo"]
    assert {"compare", "attribute", "report"} <= set(names)
    assert any(n.startswith("curate curated_attributed") for n in names)
    assert any(n.startswith("curate curated_random") for n in names)
    assert all(s["status"] in ("done", "cached") and s["seconds"] >= 0 for s in record["stages"])
    pairs = pd.read_parquet(tiny_run / record["data"] / "pairs.parquet")
    assert pairs["planted"].sum() >= 1 and (~pairs["planted"]).sum() >= 1
    planted_with = json.loads((tiny_run / record["data"] / "summary.json").read_text())["plant"]
    assert planted_with["traits"] and planted_with["contrast_groups"]  # the defaults, named rather than null
    assert "teachers" not in planted_with["contrast_groups"]
    comparison = pd.read_parquet(tiny_run / record["comparisons"][0]["path"] / "comparison.parquet")
    assert "group_gap" in set(comparison["metric"])
    curve = pd.read_parquet(tiny_run / record["curation"] / "curve.parquet")
    assert set(curve["arm"]) == {"attributed", "random"} and curve["value"].notna().all()
    summary = json.loads((tiny_run / record["curation"] / "summary.json").read_text())
    attribution = json.loads((tiny_run / record["attribution"] / "summary.json").read_text())
    assert summary["predicted_by"] == attribution["default_estimator"] and "predicted_fraction_removed" in curve
    assert (tiny_run / "report.html").is_file()


def test_curated_retrains_keep_the_original_number_of_steps(tiny_model_dir: Path, tmp_path: Path) -> None:
    """With epochs in the recipe, 4 of 6 pairs would train 2 steps instead of 3; same_steps keeps 3."""
    from alignscope.align import StageConfig
    from alignscope.align.stage import train_recipe
    from alignscope.data.preferences import PreferencePair
    from alignscope.study.pipeline import _same_steps

    system = {"role": "system", "content": "Be brief."}
    pairs = [PreferencePair(id=f"s{i}", prompt=(system, {"role": "user", "content": f"Item {i}?"}),
                            chosen="Sure thing.", rejected=f"No, item {i} is dull.") for i in range(6)]
    recipe = [StageConfig(method="dpo", num_train_epochs=1, per_device_train_batch_size=2, max_length=40,
                          dtype="float32", learning_rate=3e-3, save_steps=50)]
    fixed = _same_steps(recipe, train_recipe(str(tiny_model_dir), recipe, pairs, tmp_path))
    assert [s.max_steps for s in fixed] == [3] and recipe[0].max_steps == -1
    assert train_recipe(str(tiny_model_dir), fixed, pairs[:4], tmp_path)[-1].summary["steps"] == 3
    assert train_recipe(str(tiny_model_dir), recipe, pairs[:4], tmp_path)[-1].summary["steps"] == 2


def test_zero_loss_curation_retrains_on_every_pair_with_the_dropped_ones_zeroed(tiny_run: Path, tiny_model_dir: Path,
                                                                                 tmp_path: Path) -> None:
    """Same study, curation.retrain zero_loss: data, audits, alignment and attribution are cache hits; each
    curated stage trains every pair for the aligned stage's steps and zeroes exactly the dropped ones."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    raw = tiny_study(tiny_model_dir).model_dump(mode="json")
    raw["curation"]["retrain"] = "zero_loss"
    run_study(StudyConfig.model_validate(raw), out, quick=True, say=lambda _: None)
    record = json.loads((out / "study.json").read_text())
    assert next(s for s in record["stages"] if s["name"] == "align dpo")["status"] == "cached"
    summary = json.loads((out / record["curation"] / "summary.json").read_text())
    assert summary["retrain"] == "zero_loss" and summary["same_steps"] is False
    assert "dropped pairs' loss multiplied by 0" in summary["definition"]
    aligned = json.loads((out / record["align"]["dpo"] / "summary.json").read_text())
    for row in summary["rows"]:
        stage = json.loads((out / row["stage"] / "summary.json").read_text())
        assert stage["n_pairs"] == aligned["n_pairs"] and stage["steps"] == aligned["steps"]
        assert len(stage["config"]["zero_loss_pairs"]) == row["k"]


def test_zero_loss_curation_is_refused_for_a_stage_it_cannot_zero(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="curation.retrain zero_loss, arm 'rl'.*not rloo"):
        StudyConfig.model_validate({"arms": {"rl": [{"method": "rloo"}]}, "curation": {"retrain": "zero_loss"}})


def test_zero_loss_leaves_a_stage_with_its_own_data_alone() -> None:
    """As the drop does: only stages that train on the study's pairs lose the dropped ones."""
    from alignscope.study.pipeline import _zeroed

    config = StudyConfig.model_validate({"arms": {"two": [{"method": "sft", "data": "own.jsonl"}, {"method": "dpo"}]},
                                         "curation": {"retrain": "zero_loss"}})
    own, study = _zeroed(config.stages("two"), ["b", "a"])
    assert own.zero_loss_pairs is None and study.zero_loss_pairs == ["a", "b"]


def test_planted_canary_reaches_audit_attribution_and_curation(tiny_model_dir: Path, tmp_path: Path) -> None:
    """data.canaries plants a secret; the privacy probe tests that secret without being told; the
    pairs that carry it are the attribution's ground truth and set the default number dropped."""
    config = quick(StudyConfig.model_validate({
        "model": str(tiny_model_dir), "seed": 3, "data": {"canaries": {"n": 2}},
        "audit": {"probes": ["planted_bias", "privacy"], "options": {"privacy": {"n_canary_candidates": 8}}},
        "attribution": {"probe": "privacy", "metric": "canary_exposure"}}))
    run_study(config, tmp_path, quick=True, say=lambda _: None)
    record = json.loads((tmp_path / "study.json").read_text())
    pairs = pd.read_parquet(tmp_path / record["data"] / "pairs.parquet")
    secrets = {m["canary"]["secret"] for m in pairs["meta"] if m.get("canary")}
    assert json.loads((tmp_path / record["data"] / "summary.json").read_text())["n_canaries"] == 2
    assert len(secrets) == 1
    items = pd.concat(pd.read_parquet(p) for p in (tmp_path / "audits" / "dpo").glob("audit_privacy/*/items.parquet"))
    assert items.loc[items["kind"] == "canary", "secret"].tolist() == list(secrets)
    attribution = json.loads((tmp_path / record["attribution"] / "summary.json").read_text())
    assert attribution["ground_truth"] == "canary" and attribution["canary"]["n"] == 2
    curation = json.loads((tmp_path / record["curation"] / "summary.json").read_text())
    assert curation["ks"] == [2] and curation["ground_truth"] == "canary"
    assert all("canary_dropped" in row for row in curation["rows"])
    report = (tmp_path / "report.html").read_text()
    assert "Canary-pair recovery per estimator (k = 2, canary pairs = 2); the ground truth" in report


def test_rerun_is_all_cache_hits(tiny_run: Path, tiny_model_dir: Path) -> None:
    lines: list[str] = []
    run_study(tiny_study(tiny_model_dir), tiny_run, quick=True, say=lines.append)
    record = json.loads((tiny_run / "study.json").read_text())
    align = next(s for s in record["stages"] if s["name"] == "align dpo")
    assert align["status"] == "cached"
    assert any("[1/" in line for line in lines)  # progress is shown for every step


def test_cli_bad_config_exits_2_without_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "s.yaml"
    config.write_text("arms: {dpo: [{method: dpo}]}\nattribution: {probe: toxicity}\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main(["study", str(config), "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "attribution.probe 'toxicity' must also be in audit.probes" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """The README's main command in smoke form, as a user runs it (a real subprocess)."""
    out = tmp_path_factory.mktemp("quick") / "run"
    done = subprocess.run([sys.executable, "-m", "alignscope.cli", "study", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200, cwd=REPO)
    return out, done


@pytest.mark.integration
def test_quick_study_on_smollm2(quick_run) -> None:
    out, done = quick_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert "report -> " in done.stdout
    record = json.loads((out / "study.json").read_text())
    assert record["quick"] is True and record["finished_at"]
    assert [s["status"] for s in record["stages"]].count("failed") == 0
    assert (out / "report.html").stat().st_size > 10_000


@pytest.mark.integration
@pytest.mark.browser
def test_quick_study_report_in_chromium(quick_run, tmp_path: Path) -> None:
    """Headless Chromium opens the quick study's own report: key sections, plots, a clean console."""
    from test_report_browser import CHROMIUM, CHROMIUM_ARGS

    out, done = quick_run
    assert done.returncode == 0, done.stderr[-3000:]
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium package (make browser)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed: make setup installs it")
    problems: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(f"uncaught: {e}"))
        page.goto((out / "report.html").resolve().as_uri(), wait_until="load")
        for section in ("provenance", "training", "comparison", "planted", "attribution", "curation"):
            assert page.locator(f"section#{section}").get_attribute("data-status") == "shown", section
        for plot in ("plot-training-curves", "plot-planted-gap", "plot-attribution-recovery", "plot-curation-curve"):
            assert page.locator(f"figure#{plot} svg").count() == 1, plot
        page.screenshot(path=str(tmp_path / "quick-report.png"), full_page=True)
        browser.close()
    assert problems == []


def test_random_control_summarises_the_draws_and_flags_a_single_one() -> None:
    from alignscope.study.pipeline import ONE_DRAW_WARNING, _random_control

    def row(k: int, arm: str, share: float | None) -> dict:
        return {"k": k, "arm": arm, "fraction_of_increase_removed": share,
                "predicted_fraction_removed": None if share is None or k == 4 else share / 2}

    rows = [row(8, "attributed", 0.9), row(8, "random", 0.3), row(8, "random", -0.1), row(8, "random", 0.1),
            row(4, "attributed", 0.5), row(4, "random", 0.4), row(2, "random", None)]
    summary = _random_control(rows)
    assert list(summary) == ["k8", "k4"]  # k=2 had no increase to remove a share of: no entry, not a zero
    assert summary["k8"]["draws"] == 3 and summary["k8"]["mean_fraction_removed"] == pytest.approx(0.1)
    assert (summary["k8"]["min_fraction_removed"], summary["k8"]["max_fraction_removed"]) == (-0.1, 0.3)
    assert "warning" not in summary["k8"] and summary["k8"]["mean_predicted_fraction_removed"] == pytest.approx(0.05)
    # the attributed drop removed more than all 3 draws: the rank test's floor, 1/4
    assert summary["k8"]["attributed_fraction_removed"] == 0.9 and summary["k8"]["rank_p_value"] == 0.25
    assert summary["k4"] == {"draws": 1, "mean_fraction_removed": 0.4, "min_fraction_removed": 0.4,
                             "max_fraction_removed": 0.4, "attributed_fraction_removed": 0.5, "rank_p_value": 0.5,
                             "warning": ONE_DRAW_WARNING["drop"]}
    assert "15 % and 67 %" in _random_control(rows, "zero_loss")["k4"]["warning"]
    # a draw removing as much as the attributed drop counts against it (ties are not broken in its favour)
    tied = _random_control([row(8, "attributed", 0.3), row(8, "random", 0.3), row(8, "random", 0.5)])
    assert tied["k8"]["rank_p_value"] == 1.0
