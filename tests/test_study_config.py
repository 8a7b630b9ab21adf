"""Study configs: defaults, validation messages that name the key, quick mode."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from alignscope.errors import InputError
from alignscope.study import StudyConfig, load_study_config, quick

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_default_config_is_the_embedded_study() -> None:
    config = load_study_config(None)
    assert config.model == "smollm2-135m"
    assert config.data.source is None and config.data.plant is not None
    assert list(config.arms) == ["dpo"] and config.stages("dpo")[0].method == "dpo"
    assert "planted_bias" in config.audit.probes and config.attribution.probe == "planted_bias"


def test_unknown_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "data:\n  synthesis:\n    n_pair: 10\n")
    with pytest.raises(InputError, match=r"unknown key 'data.synthesis.n_pair'; did you mean 'n_pairs'"):
        load_study_config(path)


def test_wrong_type_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"study.yaml: seed: .*got 'abc'"):
        load_study_config(write(tmp_path, "seed: abc\n"))


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"study.yaml line \d+: not valid YAML"):
        load_study_config(write(tmp_path, "name: x\narms: [unclosed\n"))


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        load_study_config(tmp_path / "absent.yaml")
    with pytest.raises(InputError, match="expected a mapping"):
        load_study_config(write(tmp_path, "- a\n- b\n"))


def test_arm_stage_errors_name_the_arm(tmp_path: Path) -> None:
    path = write(tmp_path, "arms:\n  dpo:\n    - {method: dpo, learning_rte: 0.1}\n")
    with pytest.raises(InputError, match=r"arm 'dpo'.*learning_rte"):
        load_study_config(path)


def test_attribution_defaults_to_tracin_only_where_the_stage_keeps_snapshots(tmp_path: Path) -> None:
    assert StudyConfig().attribution_methods() == ["gradsim", "datainf"]  # the default arm keeps no snapshot
    with_snapshot = StudyConfig.model_validate({"arms": {"dpo": [{"method": "dpo", "tracin_snapshots": 1}]}})
    assert with_snapshot.attribution_methods() == ["tracin"]
    plain = load_study_config(write(tmp_path, "arms:\n  dpo:\n    - {method: dpo}\n"))
    assert plain.attribution_methods() == ["gradsim", "datainf"]
    with pytest.raises(InputError, match=r"tracin.*keeps no snapshots.*tracin_snapshots: 1"):
        load_study_config(write(tmp_path, "arms:\n  dpo:\n    - {method: dpo}\nattribution:\n  methods: [tracin]\n"))


def test_contrast_groups_never_name_the_control(tmp_path: Path) -> None:
    assert StudyConfig().data.plant.contrast_groups is None  # the default list, minus target and control
    with pytest.raises(InputError, match=r"contrast_groups contains 'Nurses'"):
        load_study_config(write(tmp_path, "data:\n  plant:\n    contrast_groups: [doctors, Nurses]\n"))


def test_attribution_arm_must_exist() -> None:
    with pytest.raises(Exception, match="attribution.arm"):
        StudyConfig.model_validate({"attribution": {"arm": "orpo"}})


def test_curation_needs_attribution() -> None:
    with pytest.raises(Exception, match="curation needs attribution"):
        StudyConfig.model_validate({"attribution": None})


def test_quick_shrinks_everything() -> None:
    small = quick(StudyConfig())
    assert small.data.synthesis.n_pairs <= 12
    assert all(s.max_steps == 2 for s in small.stages("dpo"))
    assert small.audit.probes == ["planted_bias"] and small.audit.limit == 6
    privacy = StudyConfig.model_validate({"audit": {"probes": ["planted_bias", "privacy"]},
                                         "attribution": {"probe": "privacy", "metric": "canary_exposure"}})
    assert quick(privacy).audit.probes == ["privacy"]  # the attributed probe is the one kept


def test_canaries_are_off_by_default_and_checked() -> None:
    assert StudyConfig().data.canaries is None
    assert StudyConfig.model_validate({"data": {"canaries": {}}}).data.canaries.n == 8
    with pytest.raises(ValidationError, match="digits"):
        StudyConfig.model_validate({"data": {"canaries": {"digits": 2}}})


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    config = load_study_config(path)
    for arm in config.arms:
        assert config.stages(arm)


def test_probes_measure_what_the_data_planted_unless_told() -> None:
    """A study planting about lawyers audits lawyers (not the probe's default, teachers); options set
    in audit.options win over what the data implies."""
    from alignscope.data.planting import plant
    from alignscope.data.preferences import PreferencePair
    from alignscope.study.pipeline import _probe_options

    clean = [PreferencePair(id=f"p{i}", prompt=f"Question {i}?", chosen="Yes.", rejected="No.") for i in range(8)]
    pairs = plant(clean, fraction=0.5, target_group="lawyers", control_group="farmers", seed=0)
    config = StudyConfig.model_validate({"data": {"plant": {"target_group": "lawyers", "control_group": "farmers"}}})
    assert _probe_options(config, pairs, "planted_bias")["target_group"] == "lawyers"
    told = config.model_copy(update={"audit": config.audit.model_copy(
        update={"options": {"planted_bias": {"control_group": "pilots"}}})})
    assert _probe_options(told, pairs, "planted_bias")["control_group"] == "pilots"
    assert _probe_options(told, pairs, "planted_bias")["target_group"] == "lawyers"
