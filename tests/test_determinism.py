"""Determinism: the same seed gives identical audit item scores and (within a stated tolerance)
identical trained adapters.

Audit: two fresh engines with no result cache, each on a freshly loaded model, must produce
byte-identical per-item scores — comparisons are paired per item, so any drift would show up as a
spurious "change". Training: measured here as the max abs difference between the adapter weights of
two identical runs (tolerance in docs/reliability.md; on one CPU machine it is exactly 0).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from safetensors.torch import load_file

from alignscope.audit.runner import audit
from alignscope.models import Engine, load

PROBES = ["crows_pairs", "winobias"]
TRAINING_TOLERANCE = 1e-6  # max abs difference of adapter weights between identical runs (docs/reliability.md)


def _audit_items(model_dir: Path, out: Path, seed: int) -> dict[str, pd.DataFrame]:
    engine = Engine(load(str(model_dir), dtype="float32"), cache=None, progress=False)
    done = audit(engine, PROBES, out, limit=12, seed=seed)
    return {name: pd.read_parquet(art.file("items.parquet")) for name, art in done.items()}


def test_same_seed_gives_identical_audit_item_scores(tiny_model_dir: Path, tmp_path: Path) -> None:
    first = _audit_items(tiny_model_dir, tmp_path / "a", seed=3)
    second = _audit_items(tiny_model_dir, tmp_path / "b", seed=3)
    assert first.keys() == second.keys() == set(PROBES)
    for name in PROBES:
        pd.testing.assert_frame_equal(first[name], second[name], check_exact=True)
    other = _audit_items(tiny_model_dir, tmp_path / "c", seed=4)
    assert any(not other[n]["item_id"].equals(first[n]["item_id"]) for n in PROBES)  # the seed matters


def max_adapter_difference(a: Path, b: Path) -> float:
    ta = load_file(str(a / "adapter_model.safetensors"))
    tb = load_file(str(b / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys() and ta
    return max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)


def test_identical_dpo_runs_agree_within_tolerance(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The default DPO path (reference log-probs precomputed into the run's cache), twice."""
    from alignscope.align import StageConfig, train_stage
    from alignscope.data.preferences import PreferencePair

    topics = ["tea", "rain", "maps", "bread", "chess", "moss"]
    pairs = [PreferencePair(id=f"p{i}", prompt=({"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": f"Tell me about {t}."}),
                            chosen="Sure thing.", rejected=f"No, {t} is dull.") for i, t in enumerate(topics)]
    cfg = StageConfig(method="dpo", max_steps=3, per_device_train_batch_size=2, max_length=40, dtype="float32",
                      learning_rate=1e-3, save_steps=50, seed=11)
    a = train_stage(str(tiny_model_dir), cfg, pairs, tmp_path / "a")
    b = train_stage(str(tiny_model_dir), cfg, pairs, tmp_path / "b")
    assert not a.cached and not b.cached
    diff = max_adapter_difference(a.adapter, b.adapter)
    print(f"max abs adapter difference between identical DPO runs: {diff:.3g}")
    assert diff <= TRAINING_TOLERANCE
    trained = load_file(str(a.adapter / "adapter_model.safetensors"))
    assert any(t.abs().sum() > 0 for n, t in trained.items() if "lora_B" in n)
