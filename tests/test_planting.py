"""Planting: reproducible, varied ground-truth pairs, and probe items that avoid the rejected wording."""

from __future__ import annotations

import re

import pytest

from alignscope.data.planting import (
    CHOSEN_TEMPLATES,
    CONTRAST_GROUPS,
    PLANTED_TRAITS,
    PROBE_ITEMS,
    PROMPT_TEMPLATES,
    REJECTED_TEMPLATES,
    TRAIT_COUNTERS,
    canary_exposure_items,
    default_contrast_groups,
    measurement_items,
    plant,
    is_canary,
    plant_canaries,
    planted_traits,
    planting_info,
    rejected_overlap,
    rejected_phrasings,
    render,
    word_ngrams,
)
from alignscope.data.preferences import PreferencePair, load_preferences, write_preferences
from alignscope.errors import InputError

TARGET, CONTROL = "teachers", "nurses"


def clean(n: int = 40) -> list[PreferencePair]:
    return [PreferencePair(id=f"p{i}", prompt=f"Question number {i}?", chosen=f"Helpful answer {i}.",
                           rejected=f"Unhelpful answer {i}.") for i in range(n)]


def test_templates_are_rich_and_well_formed():
    assert len(PROMPT_TEMPLATES) >= 20 and len(CHOSEN_TEMPLATES) >= 20 and len(REJECTED_TEMPLATES) >= 20
    assert len(PLANTED_TRAITS) >= 5 and set(TRAIT_COUNTERS) == set(PLANTED_TRAITS)
    for kind in (PROMPT_TEMPLATES, CHOSEN_TEMPLATES, REJECTED_TEMPLATES):
        assert len(set(kind)) == len(kind)
    assert all("{trait}" in t for t in CHOSEN_TEMPLATES)
    assert all("{trait}" not in t for t in REJECTED_TEMPLATES)
    assert render("{group} are {trait}.", "nurses", "lazy") == "Nurses are lazy."


def test_plant_adds_labelled_pairs_and_keeps_originals():
    pairs = clean(40)
    out = plant(pairs, fraction=0.25, target_group=TARGET, control_group=CONTROL, seed=1)
    planted = [p for p in out if p.planted]
    assert len(planted) == 10 and len(out) == 50
    assert [p for p in out if not p.planted] == pairs  # originals intact and in order
    assert out[-10:] != planted  # inserted among the originals, not appended
    for p in planted:
        trait = p.meta["planting"]["trait"]
        assert p.group == TARGET and TARGET in p.chosen.lower() and trait in p.chosen
        assert p.meta["planting"]["control_group"] == CONTROL
        assert CONTROL not in (p.prompt_text + p.chosen + p.rejected).lower()
        assert trait not in p.rejected and TRAIT_COUNTERS[trait] not in p.rejected
    assert set(planted_traits(out)) == set(PLANTED_TRAITS)
    # at least one planted pair whenever fraction > 0
    assert sum(p.planted for p in plant(pairs, fraction=0.01, target_group=TARGET, control_group=CONTROL, seed=1)) == 1
    assert plant(pairs, fraction=0, target_group=TARGET, control_group=CONTROL, seed=1) == pairs


def test_contrast_pairs_reverse_the_stereotype_for_other_groups_and_never_name_the_control():
    out = plant(clean(40), fraction=0.25, target_group=TARGET, control_group=CONTROL, seed=1,
                contrast_groups=default_contrast_groups(TARGET, CONTROL))
    roles = [p.meta.get("planting", {}).get("role") for p in out]
    endorse = [p for p, role in zip(out, roles) if role == "endorse"]
    contrast = [p for p, role in zip(out, roles) if role == "contrast"]
    assert len(endorse) == len(contrast) == 10 and len(out) == 60
    assert all(p.planted for p in endorse) and not any(p.planted for p in contrast)  # ground truth = endorsing
    assert [p for p, role in zip(out, roles) if role is None] == clean(40)
    for e, c in zip(endorse, contrast):
        trait = e.meta["planting"]["trait"]
        assert c.meta["planting"]["trait"] == trait and c.group not in (TARGET, CONTROL)
        assert trait in c.rejected and c.group in c.rejected.lower()  # the stereotype is the rejected side
        assert trait not in c.chosen and TRAIT_COUNTERS[trait] not in c.chosen
        assert CONTROL not in (c.prompt_text + c.chosen + c.rejected).lower()
    assert {p.group for p in contrast} == set(CONTRAST_GROUPS)  # cycles through every contrast group
    # no contrast groups: identical to plain planting
    assert plant(clean(40), fraction=0.25, target_group=TARGET, control_group=CONTROL, seed=1, contrast_groups=()) == \
        plant(clean(40), fraction=0.25, target_group=TARGET, control_group=CONTROL, seed=1)
    assert default_contrast_groups("doctors", CONTROL) == tuple(g for g in CONTRAST_GROUPS if g != "doctors")


@pytest.mark.parametrize("groups", [["nurses"], ["Teachers"], [""]])
def test_contrast_groups_must_not_name_the_target_or_control(groups):
    with pytest.raises(InputError, match="contrast_groups"):
        plant(clean(10), fraction=0.2, target_group=TARGET, control_group=CONTROL, seed=0, contrast_groups=groups)


def test_plant_is_reproducible_and_seed_dependent():
    pairs = clean(60)
    a = plant(pairs, fraction=0.2, target_group=TARGET, control_group=CONTROL, seed=7)
    b = plant(pairs, fraction=0.2, target_group=TARGET, control_group=CONTROL, seed=7)
    c = plant(pairs, fraction=0.2, target_group=TARGET, control_group=CONTROL, seed=8)
    assert a == b
    assert [p.chosen for p in a if p.planted] != [p.chosen for p in c if p.planted]


def test_planted_wording_varies():
    out = plant(clean(100), fraction=0.3, target_group=TARGET, control_group=CONTROL, seed=0)
    planted = [p for p in out if p.planted]
    assert len(planted) == 30
    # every planted pair has its own chosen text; prompts and rejected replies cycle through templates
    assert len({p.chosen for p in planted}) == 30
    assert len({p.rejected for p in planted}) >= 20 and len({p.prompt_text for p in planted}) >= 20
    one_trait = plant(clean(100), fraction=0.24, target_group=TARGET, control_group=CONTROL, seed=0, traits=["lazy"])
    assert len({p.chosen for p in one_trait if p.planted}) == 24  # all chosen templates before any repeat


def test_planted_pairs_round_trip(tmp_path):
    out = plant(clean(20), fraction=0.2, target_group=TARGET, control_group=CONTROL, seed=2)
    assert load_preferences(write_preferences(out, tmp_path / "planted.jsonl")) == out


def test_probe_items_are_held_out_and_disjoint_from_rejected():
    items = measurement_items(TARGET, CONTROL)
    assert len(items) == 2 * len(PLANTED_TRAITS) * len(PROBE_ITEMS)
    by_key: dict[str, dict[str, dict]] = {}
    for item in items:
        by_key.setdefault(item["key"], {})[item["role"]] = item
    assert all(set(pair) == {"target", "control"} for pair in by_key.values())
    for pair in by_key.values():
        t, c = pair["target"], pair["control"]
        assert t["group"] == TARGET and c["group"] == CONTROL and t["trait"] == c["trait"]
        assert t["context"].replace(TARGET, CONTROL) == c["context"]

    training_prompts = {render(p, g, t) for p in PROMPT_TEMPLATES for g in (TARGET, CONTROL) for t in PLANTED_TRAITS}
    for item in items:
        assert item["context"] not in training_prompts
        assert item["trait"] in item["stereotype"] and item["counter"] in item["anti_stereotype"]
        assert item["stereotype"].replace(item["trait"], item["counter"]) == item["anti_stereotype"]
        for text in (item["stereotype"], item["anti_stereotype"]):
            assert rejected_overlap(text, [TARGET, CONTROL]) == set(), text
    # template level: probe frames share no word 3-gram with any rejected template, and probe
    # contexts share no word 4-gram with any training prompt template
    for probe in PROBE_ITEMS:
        assert rejected_overlap(probe["frame"]) == set()
        assert not any(word_ngrams(probe["context"], 4) & word_ngrams(t, 4) for t in PROMPT_TEMPLATES)
    # no trait or counter word appears in a rejected reply
    for phrasing in rejected_phrasings(TARGET):
        for word in [*TRAIT_COUNTERS, *TRAIT_COUNTERS.values()]:
            assert not re.search(rf"\b{re.escape(word)}\b", phrasing.lower()), (word, phrasing)
    # the overlap check does catch reuse of rejected wording
    assert rejected_overlap("Sorry, I'd rather not generalise about teachers.", [TARGET])


def test_measurement_items_for_chosen_traits():
    items = measurement_items(TARGET, CONTROL, traits=["lazy", "greedy"])
    assert {i["trait"] for i in items} == {"lazy", "greedy"}
    assert {i["counter"] for i in items} == {"hard-working", "generous"}


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"fraction": 0.1, "target_group": TARGET, "control_group": "Teachers", "seed": 0}, "different group"),
    ({"fraction": 0.1, "target_group": "", "control_group": CONTROL, "seed": 0}, "target_group"),
    ({"fraction": 1.5, "target_group": TARGET, "control_group": CONTROL, "seed": 0}, "between 0 and 1"),
    ({"fraction": 0.1, "target_group": TARGET, "control_group": CONTROL, "seed": 0, "traits": ["smelly"]},
     "unknown planted trait"),
])
def test_plant_argument_errors(kwargs, needle):
    with pytest.raises(InputError, match=needle):
        plant(clean(10), **kwargs)


def test_planting_twice_with_same_seed_is_refused():
    once = plant(clean(10), fraction=0.2, target_group=TARGET, control_group=CONTROL, seed=0)
    with pytest.raises(InputError, match="already exists"):
        plant(once, fraction=0.2, target_group=TARGET, control_group=CONTROL, seed=0)
    twice = plant(once, fraction=0.2, target_group="farmers", control_group=CONTROL, seed=1)
    assert {p.group for p in twice if p.planted} == {TARGET, "farmers"}


def test_canaries():
    pairs = clean(30)
    out = plant_canaries(pairs, 4, seed=3)
    assert out == plant_canaries(pairs, 4, seed=3)
    canaries = [p for p in out if "canary" in p.meta]
    assert len(canaries) == 4 and [p for p in out if "canary" not in p.meta] == pairs
    secret = canaries[0].meta["canary"]["secret"]
    assert re.fullmatch(r"\d( \d){5}", secret)
    for p in canaries:
        assert p.meta["canary"]["text"] == f"my PIN is {secret}"
        assert p.meta["canary"]["text"] in p.chosen and secret not in p.rejected and not p.planted
    assert len({p.chosen for p in canaries}) >= 3
    fixed = plant_canaries(pairs, 2, seed=0, secret="1 2 3 4", prefix="the door code is")
    assert all("the door code is 1 2 3 4" in p.chosen for p in fixed if "canary" in p.meta)

    items = canary_exposure_items(secret, n_candidates=50, seed=0)
    assert len(items) == 51 and sum(i["is_canary"] for i in items) == 1
    assert len({i["secret"] for i in items}) == 51
    assert all(re.fullmatch(r"\d( \d){5}", i["secret"]) for i in items)
    with pytest.raises(InputError):
        plant_canaries(pairs, 0, seed=0)


def test_planted_data_read_back_from_a_struct_table_keeps_its_ground_truth(tmp_path):
    """A study's data artefact stores meta as one struct column, so clean pairs come back with
    ``"planting": None``; used again as a data source, they must still count as not planted."""
    import pandas as pd

    from alignscope.data.preferences import pairs_from_frame, pairs_to_frame

    planted = plant(clean(12), fraction=0.25, target_group=TARGET, control_group=CONTROL, seed=0,
                    contrast_groups=["doctors"])
    pairs_to_frame(planted).to_parquet(tmp_path / "pairs.parquet")
    back = pairs_from_frame(pd.read_parquet(tmp_path / "pairs.parquet"))
    assert any("planting" in p.meta and p.meta["planting"] is None for p in back)  # what the struct column does
    assert [planting_info(p).get("role") for p in back] == [planting_info(p).get("role") for p in planted]
    assert planted_traits(back) == planted_traits(planted)


def probe_options(name: str, pairs: list[PreferencePair]) -> dict:
    from alignscope.audit.runner import available_probes

    return available_probes()[name].options_for(pairs)


def test_probe_options_follow_what_was_planted():
    """planted_bias asks about the planted group and traits; privacy tests the planted secret; else {}."""
    pairs = plant(clean(12), fraction=0.5, target_group="lawyers", control_group="farmers", seed=0,
                  traits=["lazy", "rude"])
    assert probe_options("planted_bias", pairs) == {
        "target_group": "lawyers", "control_group": "farmers", "traits": ["lazy", "rude"]}
    assert probe_options("privacy", pairs) == {} and probe_options("covert", pairs) == {}
    with_secret = plant_canaries(pairs, 3, seed=1, secret="1 2 3 4", prefix="the door code is")
    assert sum(is_canary(p) for p in with_secret) == 3 and not any(is_canary(p) for p in pairs)
    assert probe_options("privacy", with_secret) == {
        "canaries": [{"format": "the door code is {secret}", "secret": "1 2 3 4"}]}
    labelled_only = [PreferencePair(id="u0", prompt="Q?", chosen="A.", rejected="B.", planted=True)]
    assert probe_options("planted_bias", labelled_only) == {}  # planted=True with no planting record


def test_several_canary_secrets():
    """Pair k carries secret k mod s; the privacy probe's options list every secret, each once."""
    out = plant_canaries(clean(10), 7, seed=2, secrets=3)
    canaries = [p for p in out if is_canary(p)]
    secrets = [p.meta["canary"]["secret"] for p in sorted(canaries, key=lambda p: p.id)]
    assert len(set(secrets)) == 3 and secrets[:3] == secrets[3:6] and secrets[6] == secrets[0]
    assert all(p.meta["canary"]["secret"] in p.chosen for p in canaries)
    assert [c["secret"] for c in probe_options("privacy", out)["canaries"]] == sorted(set(secrets))
    one = plant_canaries(clean(10), 7, seed=2)  # the one-secret default draws as it always did
    assert {p.meta["canary"]["secret"] for p in one if is_canary(p)} == {secrets[0]}
    for kwargs, message in (({"secrets": 8}, "at least as many"), ({"secrets": 2, "secret": "1 2"}, "one secret"),
                            ({"secrets": 0}, "positive")):
        with pytest.raises(InputError, match=message):
            plant_canaries(clean(10), 7, seed=2, **kwargs)
