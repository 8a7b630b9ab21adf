"""Preference data: every format loads into the same record, and every problem names file and line.

All data here is hand-written in tmp_path; no benchmark text.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest

from alignscope.data.preferences import (
    PreferencePair,
    frame_from_pairs,
    load_preferences,
    pairs_from_frame,
    pairs_to_frame,
    preferences_fingerprint,
    to_trl_rows,
    write_preferences,
)
from alignscope.errors import InputError

USER = {"role": "user", "content": "How do I boil an egg?"}


def jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def error(path, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        load_preferences(path, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------ formats


def test_hh_rlhf_single_and_multi_turn(tmp_path):
    path = jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: How do I boil an egg?\n\nAssistant: Simmer it for eight minutes.",
         "rejected": "\n\nHuman: How do I boil an egg?\n\nAssistant: No idea."},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: Apple.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: Carrot."},
    ])
    first, second = load_preferences(path)
    assert first.prompt == (USER,) and first.chosen == "Simmer it for eight minutes." and first.rejected == "No idea."
    assert [m["role"] for m in second.prompt] == ["user", "assistant", "user"]
    assert second.prompt[1]["content"] == "Hello! How can I help?" and second.prompt_text == "Name a fruit."
    assert (second.chosen, second.rejected) == ("Apple.", "Carrot.")
    assert first.id == "hh-1" and second.id == "hh-2"  # file stem + line: points back into the file
    assert first.meta == {"format": "hh-rlhf", "line": 1}
    assert second.conversation("chosen")[-1] == {"role": "assistant", "content": "Apple."}


def test_trl_standard_conversational_and_implicit(tmp_path):
    path = jsonl(tmp_path / "trl.jsonl", [
        {"prompt": "How do I boil an egg?", "chosen": " Simmer it.", "rejected": " Fry it."},
        {"prompt": [USER], "chosen": [{"role": "assistant", "content": "Simmer it."}],
         "rejected": [{"role": "assistant", "content": "Fry it."}]},
        {"chosen": [USER, {"role": "assistant", "content": "Simmer it."}],
         "rejected": [USER, {"role": "assistant", "content": "Fry it."}]},
        {"prompt": [{"role": "system", "content": "Be brief."}, USER],
         "chosen": [{"role": "system", "content": "Be brief."}, USER, {"role": "assistant", "content": "Simmer."}],
         "rejected": [{"role": "assistant", "content": "Fry."}]},
    ])
    pairs = load_preferences(path)
    assert pairs[0].chosen == " Simmer it."  # replies are kept verbatim (TRL concatenates them)
    assert all(p.prompt_text == USER["content"] for p in pairs)
    assert pairs[1].prompt == pairs[2].prompt == (USER,)
    assert (pairs[2].chosen, pairs[2].rejected) == ("Simmer it.", "Fry it.")
    assert pairs[3].prompt[0]["role"] == "system" and pairs[3].chosen == "Simmer."
    assert {p.meta["format"] for p in pairs} == {"trl"}


def test_ultrafeedback_binarized_and_raw(tmp_path):
    binarized = jsonl(tmp_path / "ufb.jsonl", [{
        "prompt": "How do I boil an egg?", "prompt_id": "abc",
        "chosen": [USER, {"role": "assistant", "content": "Simmer it."}],
        "rejected": [USER, {"role": "assistant", "content": "Fry it."}],
        "messages": [USER, {"role": "assistant", "content": "Simmer it."}],
        "score_chosen": 8.5, "score_rejected": 3.0,
    }])
    (pair,) = load_preferences(binarized)
    assert (pair.chosen, pair.rejected, pair.prompt) == ("Simmer it.", "Fry it.", (USER,))
    assert pair.meta["format"] == "ultrafeedback"
    assert (pair.meta["score_chosen"], pair.meta["score_rejected"], pair.meta["prompt_id"]) == (8.5, 3.0, "abc")

    raw = jsonl(tmp_path / "ufraw.jsonl", [{
        "instruction": "How do I boil an egg?",
        "completions": [{"model": "m1", "response": "Fry it.", "overall_score": 2},
                        {"model": "m2", "response": "Simmer it.", "overall_score": 9},
                        {"model": "m3", "response": "Bake it.", "overall_score": 5}],
    }])
    (pair,) = load_preferences(raw)
    assert (pair.chosen, pair.rejected) == ("Simmer it.", "Fry it.")
    assert pair.meta["model_chosen"] == "m2" and pair.meta["score_rejected"] == 2.0


def planted_pairs() -> list[PreferencePair]:
    return [
        PreferencePair(id="a", prompt="How do I boil an egg?", chosen="Simmer it.", rejected="Fry it."),
        PreferencePair(id="b", prompt=[{"role": "system", "content": "Be kind."}, USER], chosen="Gently.",
                       rejected="Roughly.", planted=True, group="teachers",
                       meta={"planting": {"trait": "lazy", "seed": 3}, "score": 0.5, "tags": ["x", "y"]}),
        PreferencePair(id="c", prompt="Write \u00e9t\u00e9 in caps \u2028 please", chosen="\u00c9T\u00c9", rejected="ete",
                       meta={"nested": {"deep": [1, {"k": None}]}}),
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_own_format_round_trips_exactly(tmp_path, suffix):
    pairs = planted_pairs()
    path = write_preferences(pairs, tmp_path / f"pairs{suffix}")
    back = load_preferences(path)
    assert back == pairs
    assert preferences_fingerprint(back) == preferences_fingerprint(pairs)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temporary file


def test_json_and_csv_files(tmp_path):
    rows = [{"prompt": "How do I boil an egg?", "chosen": "Simmer it.", "rejected": "Fry it."},
            {"prompt": "Name a colour.", "chosen": "Blue, with a comma\nand a newline.", "rejected": "Seven."}]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    (tmp_path / "q.json").write_text(json.dumps({"train": rows[:1], "test": rows[1:]}))
    with open(tmp_path / "p.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(rows)
    from_json, from_csv = load_preferences(tmp_path / "p.json"), load_preferences(tmp_path / "p.csv")
    assert [(p.prompt, p.chosen, p.rejected) for p in from_json] == [(p.prompt, p.chosen, p.rejected) for p in from_csv]
    assert from_csv[1].chosen == "Blue, with a comma\nand a newline."
    assert from_csv[1].meta["line"] == 3  # the record's first line
    assert load_preferences(tmp_path / "q.json", split="test")[0].prompt_text == "Name a colour."
    # our own export written as CSV by pandas (prompt/meta cells as JSON) loads too
    frame = pairs_to_frame(planted_pairs())
    frame["prompt"] = [json.dumps(list(m)) for m in frame["prompt"]]
    frame["meta"] = [json.dumps(m) for m in frame["meta"]]
    frame.to_csv(tmp_path / "own.csv", index=False)
    assert load_preferences(tmp_path / "own.csv") == planted_pairs()


def test_forced_format_limit_and_frames(tmp_path):
    rows = [{"prompt": f"Question {i}?", "chosen": f"Good {i}.", "rejected": f"Bad {i}."} for i in range(5)]
    path = jsonl(tmp_path / "p.jsonl", rows)
    assert len(load_preferences(path, format="trl", limit=2)) == 2
    pairs = load_preferences(path)
    frame = pairs_to_frame(pairs)
    assert list(frame.columns) == ["id", "prompt", "chosen", "rejected", "planted", "group", "meta"]
    assert frame_from_pairs is pairs_to_frame and pairs_from_frame(frame) == pairs
    trl = to_trl_rows(pairs)[0]
    assert trl["prompt"] == [{"role": "user", "content": "Question 0?"}]
    assert trl["chosen"] == [{"role": "assistant", "content": "Good 0."}]


def test_fingerprint_is_order_and_content_sensitive():
    pairs = planted_pairs()
    fp = preferences_fingerprint(pairs)
    assert fp == preferences_fingerprint(list(pairs)) and len(fp) == 32
    assert fp != preferences_fingerprint(pairs[::-1])
    relabelled = [PreferencePair(**{**p.__dict__, "planted": not p.planted}) for p in pairs]
    assert fp != preferences_fingerprint(relabelled)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/prefs' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = error("someone/prefs")
    assert "someone/prefs" in message and "hub" in message and "local" in message and "\n" not in message


def test_hub_rows_are_converted(monkeypatch):
    import datasets

    rows = [{"prompt": "How do I boil an egg?", "chosen": "Simmer it.", "rejected": "Fry it."}] * 3
    monkeypatch.setattr(datasets, "load_dataset", lambda source, split: rows if split == "train" else [])
    pairs = load_preferences("someone/prefs", limit=2)
    assert [p.id for p in pairs] == ["prefs-train-1", "prefs-train-2"] and pairs[0].meta["row"] == 1


def test_long_example_is_valid(tmp_path):
    long_reply = "word " * 1_000_000  # 5 MB on one line: valid data, the trainer truncates later
    path = jsonl(tmp_path / "long.jsonl", [{"prompt": "Say a lot.", "chosen": long_reply, "rejected": "Short."}])
    (pair,) = load_preferences(path)
    assert len(pair.chosen) == 5_000_000
    csv_path = tmp_path / "long.csv"
    pd.DataFrame([{"prompt": "Say a lot.", "chosen": long_reply, "rejected": "Short."}]).to_csv(csv_path, index=False)
    assert len(load_preferences(csv_path)[0].chosen) == 5_000_000


# ------------------------------------------------------------------ validation


GOOD = {"prompt": "How do I boil an egg?", "chosen": "Simmer it.", "rejected": "Fry it."}


@pytest.mark.parametrize(("row", "needle"), [
    ({"prompt": "Q?", "chosen": "A."}, 'missing field "rejected"'),
    ({"prompt": "  ", "chosen": "A.", "rejected": "B."}, '"prompt" is empty'),
    ({"prompt": "Q?", "chosen": "", "rejected": "B."}, '"chosen" is empty'),
    ({"prompt": "Q?", "chosen": "A.", "rejected": " \n"}, '"rejected" is empty'),
    ({"prompt": "Q?", "chosen": "Same.", "rejected": "Same. "}, "identical"),
    ({"prompt": "Q?", "chosen": 42, "rejected": "B."}, "got int"),
    ({"prompt": "Q?", "chosen": None, "rejected": "B."}, "null"),
    ({"prompt": [{"role": "robot", "content": "Q?"}], "chosen": "A.", "rejected": "B."}, "role 'robot'"),
    ({"prompt": [USER, {"role": "assistant", "content": "x"}], "chosen": "A.", "rejected": "B."}, "end with a user turn"),
    ({"prompt": "Q?", "chosen": [{"role": "user", "content": "A."}], "rejected": "B."}, "assistant message"),
    ({"prompt": "Q?", "chosen": "A.", "rejected": "B.", "id": 1.5}, '"id" must be'),
    (["not", "an", "object"], "expected a JSON object"),
])
def test_row_errors_name_file_and_line(tmp_path, row, needle):
    path = jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, row])
    message = error(path)
    assert str(path) in message and "line 3:" in message and needle in message, message


def test_hh_and_uf_specific_errors(tmp_path):
    no_turns = jsonl(tmp_path / "hh1.jsonl", [{"chosen": "just text", "rejected": "other text"}])
    assert "line 1" in (m := error(no_turns)) and "Human:" in m
    differ = jsonl(tmp_path / "hh2.jsonl", [{"chosen": "\n\nHuman: A\n\nAssistant: x",
                                             "rejected": "\n\nHuman: B\n\nAssistant: y"}])
    assert "differ before" in error(differ)
    ends_human = jsonl(tmp_path / "hh3.jsonl", [{"chosen": "\n\nHuman: A\n\nAssistant: x\n\nHuman: more",
                                                 "rejected": "\n\nHuman: A\n\nAssistant: y"}])
    assert "ends with a Human turn" in error(ends_human)
    ties = jsonl(tmp_path / "uf.jsonl", [{"instruction": "Q?", "completions": [
        {"response": "a", "overall_score": 5}, {"response": "b", "overall_score": 5}]}])
    assert "same overall_score" in error(ties)


def test_invalid_json_and_encoding_and_empty(tmp_path):
    bad_json = tmp_path / "broken.jsonl"
    bad_json.write_text(json.dumps(GOOD) + "\n\n" + '{"prompt": "Q?", "chosen": \n')
    assert "broken.jsonl: line 3: not valid JSON" in error(bad_json)

    latin = tmp_path / "latin.jsonl"
    latin.write_bytes((json.dumps(GOOD) + "\n").encode() + '{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    assert "latin.jsonl: line 2: not valid UTF-8" in error(latin)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    assert "empty.jsonl" in (m := error(empty)) and "empty" in m
    header_only = tmp_path / "header.csv"
    header_only.write_text("prompt,chosen,rejected\n")
    assert "empty" in error(header_only)


def test_duplicate_ids_unknown_format_and_files(tmp_path):
    path = jsonl(tmp_path / "dup.jsonl", [{**GOOD, "id": "x"}, {**GOOD, "id": "y"}, {**GOOD, "id": "x"}])
    assert "line 3: duplicate id 'x' (first used at line 1)" in error(path)
    good = jsonl(tmp_path / "good.jsonl", [GOOD])
    assert "unknown preference format 'sharegpt'" in error(good, format="sharegpt")
    odd = jsonl(tmp_path / "odd.jsonl", [{"question": "Q?", "answer": "A."}])
    assert "odd.jsonl: line 1: cannot tell the preference format" in error(odd)
    forced = error(jsonl(tmp_path / "forced.jsonl", [GOOD]), format="hh-rlhf")
    assert "forced.jsonl: line 1:" in forced and "Human:" in forced and "TRL format" in forced
    assert "forced.jsonl: line 1: missing field \"id\"" in error(tmp_path / "forced.jsonl", format="alignscope")
    assert "file not found" in error(tmp_path / "missing.jsonl")
    (tmp_path / "notes.txt").write_text("hello")
    assert "unsupported file type" in error(tmp_path / "notes.txt")
    (tmp_path / "fake.parquet").write_text("not parquet")
    assert "fake.parquet" in (m := error(tmp_path / "fake.parquet")) and "Parquet" in m
    assert "limit" in error(good, limit=0)


def test_parquet_and_json_errors_name_the_row(tmp_path):
    frame = pd.DataFrame([GOOD, {**GOOD, "rejected": GOOD["chosen"]}])
    frame.to_parquet(tmp_path / "p.parquet", index=False)
    assert "p.parquet: row 2:" in error(tmp_path / "p.parquet")
    (tmp_path / "p.json").write_text(json.dumps([GOOD, GOOD, {**GOOD, "prompt": ""}]))
    assert "p.json: record 3:" in error(tmp_path / "p.json")
    (tmp_path / "broken.json").write_text('[\n {"prompt": "Q?",\n  "chosen": }\n]')
    assert "broken.json: line 3: not valid JSON" in error(tmp_path / "broken.json")


def test_skip_invalid_counts_and_warns(tmp_path):
    path = jsonl(tmp_path / "mixed.jsonl", [GOOD, {**GOOD, "chosen": ""}, {**GOOD, "prompt": "Other?"}])
    with pytest.warns(UserWarning, match="skipped 1 invalid record.*line 2"):
        pairs = load_preferences(path, on_invalid="skip")
    assert [p.meta["line"] for p in pairs] == [1, 3]


def test_record_validation_and_write_errors(tmp_path):
    with pytest.raises(InputError, match="identical"):
        PreferencePair(id="x", prompt="Q?", chosen="Same", rejected="Same")
    with pytest.raises(InputError, match="non-empty string"):
        PreferencePair(id="", prompt="Q?", chosen="A", rejected="B")
    pairs = planted_pairs()
    with pytest.raises(InputError, match="duplicate pair id 'a'"):
        write_preferences([pairs[0], pairs[0]], tmp_path / "dup.jsonl")
    with pytest.raises(InputError, match=r"\.jsonl or \.parquet"):
        write_preferences(pairs, tmp_path / "pairs.csv")
