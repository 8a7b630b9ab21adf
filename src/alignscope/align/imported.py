"""Import a LoRA adapter trained outside alignscope as a stage, so ``attribute`` and ``curate`` can read it.

Why: most teams post-train with their own TRL script, not ``alignscope align``. Attribution needs
three things a stage directory already holds: the policy (base model + LoRA adapter), the pairs it
trained on, and the objective (method, beta, loss type, max length, truncation). ``import_stage``
writes those into ``RUN/align/<key>/`` in the same layout as a trained stage (``adapter/``,
``pairs.parquet``, ``summary.json``), so every later command works on it unchanged.

What an import cannot know is stated, not invented: the summary's steps, loss and times are null and
``imported`` records where the adapter came from. The LoRA settings are read from the adapter's own
``adapter_config.json`` (so a counterfactual retrain builds an adapter of the same shape). The DPO
reference is not cached: attribution recomputes it with the adapter disabled, which is TRL's own
reference for a PEFT model trained without a separate ``ref_model``. The objective's other settings
(beta, loss_type, max_length, ...) come from the stage YAML the user passes and must match the
training run; they cannot be checked from the adapter.

A fully fine-tuned checkpoint (``--checkpoint``) becomes a ``finetune: full`` stage (``model/``).
There is no adapter to disable, so the reference a DPO/IPO/KTO objective needs is computed here,
once, from the base model (``--model``) on the checkpoint's own tokenisation of the pairs, and
stored in the stage as ``ref_logps.parquet``: TRL's reference for a full fine-tune run without a
separate ``ref_model`` is a frozen copy of the model it started from. The base model must have the
checkpoint's architecture and parameter shapes (checked); both are in memory at once for a moment.

TracIn needs the adapter as it was during training: the ``checkpoint-<k>/`` directories a TRL run
saves (``--snapshot``, repeatable) become the stage's ``snapshots/step-<k>/``. Checkpoint k holds
the weights after k updates, i.e. before update k+1, which is what a snapshot alignscope saves
itself holds; its learning rate is read from the run's logs (``tracin_snapshots``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignscope.align.config import StageConfig, load_stage_config, parse_stages
from alignscope.align.reference import REFERENCE_FILE
from alignscope.errors import InputError
from alignscope.store import RunDir, atomic_write_json, atomic_write_parquet, file_hash, versions

#: Methods whose per-pair training objective attribution knows (RLOO's reward has none per pair).
IMPORTABLE = ("sft", "dpo", "ipo", "orpo", "kto", "simpo")
WEIGHTS_FILE = "adapter_model.safetensors"
_LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora")


def adapter_lora_settings(adapter: Path) -> dict[str, Any]:
    """The adapter's LoRA settings in ``LoraSettings`` names, refusing what attribution cannot cover.

    Refused: adapters other than LoRA, weights stored only as a pickle (``adapter_model.bin``: loading
    one runs code from the file), and ``modules_to_save`` (fully trained modules outside LoRA, whose
    gradients attribution does not collect).
    """
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise InputError(f"--adapter {adapter}: no adapter_config.json; pass the directory a PEFT model was saved to "
                         "(model.save_pretrained(DIR) or trainer.save_model(DIR))")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise InputError(f"--adapter {adapter}: adapter_config.json is not valid JSON ({exc})") from None
    if str(raw.get("peft_type", "")).upper() != "LORA":
        raise InputError(f"--adapter {adapter}: peft_type {raw.get('peft_type')!r}; attribution needs a LoRA adapter")
    if not (adapter / WEIGHTS_FILE).is_file():
        pickled = " (adapter_model.bin is a pickle, which alignscope does not load)" \
            if (adapter / "adapter_model.bin").exists() else ""
        raise InputError(f"--adapter {adapter}: no {WEIGHTS_FILE}{pickled}; re-save it with "
                         "model.save_pretrained(DIR, safe_serialization=True)")
    if raw.get("modules_to_save"):
        raise InputError(f"--adapter {adapter}: modules_to_save {raw['modules_to_save']} are trained in full, "
                         "and attribution covers LoRA weights only; import an adapter without them")
    targets = raw.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise InputError(f"--adapter {adapter}: target_modules {targets!r} is not a list of module names "
                         "(a regex is not supported)")
    settings = {key: raw[key] for key in _LORA_KEYS if raw.get(key) is not None}
    settings["target_modules"] = sorted(targets)
    return settings


def _trainer_state(checkpoint: Path) -> dict[str, Any]:
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"--snapshot {checkpoint}: no readable trainer_state.json with global_step ({exc}); pass a "
                         "checkpoint-<step> directory the Trainer saved") from None
    return state


def tracin_snapshots(checkpoints: Sequence[Path], lora: dict[str, Any]) -> list[dict[str, Any]]:
    """``{"path", "step", "learning_rate", "rate_logged_at"}`` of TRL ``checkpoint-<k>`` directories, by step.

    TracIn weights the adapter after k updates by the learning rate of update k+1, the one taken from
    it. The Trainer (transformers 5) logs each update's rate at that update's step, so the rate comes
    from step k+1 of any given checkpoint's log; after the run's last update it is 0; where step k+1 was
    not logged, the rate logged at step k stands in (``rate_logged_at`` says which). Refuses
    checkpoints with other LoRA settings than the imported adapter, or with neither rate logged.
    """
    states = {Path(c): _trainer_state(Path(c)) for c in checkpoints}
    rates = {entry["step"]: float(entry["learning_rate"]) for state in states.values()
             for entry in state.get("log_history", []) if "learning_rate" in entry and "step" in entry}
    out = []
    for checkpoint, state in states.items():
        if adapter_lora_settings(checkpoint) != lora:
            raise InputError(f"--snapshot {checkpoint}: its LoRA settings differ from --adapter's; pass checkpoints "
                             "of the same training run")
        step, last = int(state["global_step"]), state.get("max_steps")
        if last is not None and step >= int(last):
            rate, at = 0.0, None  # no update followed the run's last one
        elif step + 1 in rates or step in rates:
            at = step + 1 if step + 1 in rates else step
            rate = rates[at]
        else:
            raise InputError(f"--snapshot {checkpoint}: trainer_state.json logs no learning rate at step {step} or "
                             f"{step + 1}; TracIn weights each checkpoint by it (save checkpoints at logged steps: "
                             "save_steps a multiple of logging_steps)")
        out.append({"path": checkpoint, "step": step, "learning_rate": rate, "rate_logged_at": at})
    steps = [x["step"] for x in out]
    if len(set(steps)) != len(steps):
        raise InputError(f"--snapshot: two checkpoints are at the same step ({sorted(steps)}); pass each step once")
    return sorted(out, key=lambda x: x["step"])


def checkpoint_weights_check(checkpoint: Path) -> None:
    """Refuse what is not a full transformers checkpoint with safetensors weights (before any loading)."""
    from alignscope.models.loading import refuse_pickled_weights

    if (checkpoint / "adapter_config.json").is_file():
        raise InputError(f"--checkpoint {checkpoint}: holds a PEFT adapter; import it with --adapter")
    if not (checkpoint / "config.json").is_file():
        raise InputError(f"--checkpoint {checkpoint}: no config.json; pass the directory a fully fine-tuned model "
                         "was saved to (model.save_pretrained(DIR) or trainer.save_model(DIR))")
    refuse_pickled_weights(f"--checkpoint {checkpoint}", checkpoint)


def imported_stage_config(method: str | None, config: Path | None, lora: dict[str, Any] | None) -> StageConfig:
    """The stage config that describes the external training run: the adapter's LoRA settings, or
    ``finetune: full`` for a checkpoint (``lora`` None)."""
    if config is not None:
        stages = load_stage_config(config)
        if len(stages) != 1:
            raise InputError(f"--config {config}: a {len(stages)}-stage recipe; import one stage, described by "
                             "a one-stage YAML")
        stage = stages[0]
        if method is not None and method != stage.method:
            raise InputError(f"--method {method}: the config says method {stage.method}; make them agree")
    elif method is None:
        raise InputError("import-stage needs --method (" + ", ".join(IMPORTABLE) + ") or a --config stage YAML")
    else:
        stage = parse_stages({"method": method}, "command line")[0]
    if stage.method not in IMPORTABLE:
        raise InputError(f"method {stage.method}: attribution has no per-pair objective for it; import one of "
                         + ", ".join(IMPORTABLE))
    finetune = "lora" if lora is not None else "full"
    if "finetune" in stage.model_fields_set and stage.finetune != finetune:
        given_as = "--adapter (LoRA)" if lora is not None else "--checkpoint (a full model)"
        raise InputError(f"--config {config}: finetune: {stage.finetune}, but {given_as} was given; make them agree")
    if lora is None:  # validated again: some settings (e.g. tracin_snapshots) need LoRA
        return parse_stages({**stage.model_dump(mode="json", exclude_unset=True), "finetune": "full"},
                            str(config or "command line"))[0]
    given = stage.lora.model_dump(exclude_unset=True) if "lora" in stage.model_fields_set else {}
    clash = sorted(k for k, v in given.items() if k in lora and _normalised(v) != _normalised(lora[k]))
    if clash:
        raise InputError(f"--config {config}: lora.{clash[0]} is {given[clash[0]]!r} but the adapter has "
                         f"{lora[clash[0]]!r}; drop the lora block (it is read from adapter_config.json)")
    return stage.model_copy(update={"lora": stage.lora.model_validate({**stage.lora.model_dump(), **lora})})


def _normalised(value: Any) -> Any:
    return sorted(value) if isinstance(value, list) else value


def import_stage(model: str, adapter: str | Path | None, data: str | Path, out: str | Path, *,
                 method: str | None = None, config: str | Path | None = None,
                 checkpoint: str | Path | None = None, snapshots: Sequence[str | Path] = ()) -> Any:
    """Write an externally trained LoRA adapter (or fully fine-tuned checkpoint), its training pairs
    and objective as a stage of ``out``.

    Args:
        model: the base model it was trained from (built-in name, local directory or hub id); for a
            checkpoint, also the DPO/KTO reference.
        adapter: the PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        data: the preference pairs it was trained on, in any format ``load_preferences`` reads.
        out: run directory.
        method: the training method; optional when ``config`` names it.
        config: a one-stage YAML with the objective's settings (beta, loss_type, max_length, ...).
        checkpoint: instead of ``adapter``, a fully fine-tuned model directory (safetensors weights).
        snapshots: TRL ``checkpoint-<k>`` directories of the adapter's run, for TracIn.

    Returns:
        The ``StageResult`` (a cache hit when the same weights, data and config were imported before).
    """
    from alignscope.align.stage import ALIGN_STAGE, PAIRS_FILE, SNAPSHOT_DIR, StageResult, _use_cpu, \
        resolve_precision
    from alignscope.data.preferences import load_preferences, preferences_fingerprint, write_preferences
    from alignscope.models import load

    if (adapter is None) == (checkpoint is None):
        raise InputError("import-stage needs exactly one of --adapter (a LoRA adapter) and --checkpoint "
                         "(a fully fine-tuned model)")
    trained = Path(adapter if adapter is not None else checkpoint)  # type: ignore[arg-type]
    if adapter is not None:
        lora: dict[str, Any] | None = adapter_lora_settings(trained)
    else:
        checkpoint_weights_check(trained)
        lora = None
    if snapshots and lora is None:
        raise InputError("--snapshot: TracIn snapshots are LoRA adapters; a fully fine-tuned --checkpoint has none "
                         "(attribute it with --method gradsim or datainf)")
    kept = [] if lora is None else tracin_snapshots([Path(p) for p in snapshots], lora)
    stage = imported_stage_config(method, None if config is None else Path(config), lora)
    pairs = load_preferences(data)  # refuses an empty file and duplicate ids itself
    import torch

    from alignscope.models.loading import resolve_device

    device = torch.device("cpu") if _use_cpu() else resolve_device("auto")
    weights, autocast = resolve_precision(stage, device)  # what `align` would train this stage in here
    spec = str(Path(model).resolve()) if Path(model).is_dir() else str(model)
    if lora is not None:
        lm = load(spec, adapter=trained, dtype=weights, device=device)  # refuses an adapter that does not fit
        base, source = None, lm.source
    else:
        lm = load(str(trained.resolve()), dtype=weights, device=device)
        base = load(spec, dtype=weights, device=device)  # the reference, and what the checkpoint must fit
        source = base.source
    if not getattr(lm.tokenizer, "chat_template", None):
        which = f"--model {model}" if lora is not None else f"--checkpoint {trained}"
        raise InputError(f"{which}: has no chat template, and attribution formats pairs as chat turns")
    precision = {"weights": str(weights).removeprefix("torch."), "bf16_autocast": autocast}
    inputs = {"stage": ALIGN_STAGE, "imported": lm.fingerprint, "method": stage.method,
              "data": preferences_fingerprint(pairs), "config": stage.result_dict(), "precision": precision}
    if base is not None:
        inputs["reference"] = base.fingerprint
    if kept:
        inputs["snapshots"] = [{"step": x["step"], "learning_rate": x["learning_rate"],
                                "weights": file_hash(x["path"] / WEIGHTS_FILE)} for x in kept]
    run = RunDir(out)
    found = run.find(ALIGN_STAGE, inputs)
    if found is not None:
        return StageResult.from_dir(found.path, cached=True)
    reference = None if base is None else base_reference(base, lm, trained, stage, pairs)
    del base  # a full model's base is no longer needed: free it before writing the checkpoint
    with run.build(ALIGN_STAGE, inputs) as scratch:
        if lora is not None:
            _copy_adapter(trained, scratch / "adapter")
            for x in kept:
                target = scratch / SNAPSHOT_DIR / f"step-{x['step']}"
                _copy_adapter(x["path"], target)
                atomic_write_json(target / "snapshot.json", {k: x[k] for k in ("step", "learning_rate",
                                                                               "rate_logged_at")})
        else:
            lm.model.save_pretrained(scratch / "model")
            lm.tokenizer.save_pretrained(scratch / "model")
        write_preferences(pairs, scratch / PAIRS_FILE)
        summary = _summary(stage, spec, source, lm, trained, pairs, precision, inputs["data"], versions())
        if kept:
            summary["imported"]["snapshots"] = [str(x["path"].resolve()) for x in kept]
        if reference is not None:
            atomic_write_parquet(scratch / REFERENCE_FILE, reference)
            summary["reference"] = {"path": f"{ALIGN_STAGE}/{RunDir.key(inputs)}", "cache_hit": None,
                                    "computed_by": "import-stage, from the base model (--model)"}
        atomic_write_json(scratch / "summary.json", summary)
    found = run.find(ALIGN_STAGE, inputs)
    assert found is not None
    return StageResult.from_dir(found.path, cached=False)


def _copy_adapter(source: Path, target: Path) -> None:
    """The adapter's config and safetensors weights only (not a checkpoint's optimizer or RNG pickles)."""
    target.mkdir(parents=True)
    for name in ("adapter_config.json", WEIGHTS_FILE):
        shutil.copyfile(source / name, target / name)


def base_reference(base: Any, policy: Any, checkpoint: Path, stage: StageConfig, pairs: list[Any]) -> Any:
    """The reference table of a full fine-tune (None when its objective has none): the base model's
    side log-probs of each pair, on the tokens attribution will score, in the reference cache's columns.

    Refuses a base whose parameters differ in name or shape from the checkpoint's, since the
    reference must be the model the checkpoint was trained from.
    """
    import numpy as np
    import pandas as pd

    from alignscope.attribute.gradients import side_logprobs
    from alignscope.attribute.objective import LogProbModel, objective_from_summary

    theirs = {name: tuple(t.shape) for name, t in policy.model.state_dict().items()}
    ours = {name: tuple(t.shape) for name, t in base.model.state_dict().items()}
    if theirs != ours:
        name = sorted(set(theirs) ^ set(ours)) or sorted(k for k in theirs if theirs[k] != ours[k])
        raise InputError(f"--checkpoint {checkpoint}: does not fit model {base.spec} (parameter {name[0]} differs); "
                         "pass the --model it was fine-tuned from")
    objective = objective_from_summary({"method": stage.method, "config": stage.model_dump(mode="json")})
    if not objective.needs_reference:
        return None
    sides = objective.sides  # DPO, IPO and KTO: chosen and rejected
    rows: dict[str, list[Any]] = {side: [] for side in sides}
    full: dict[str, list[int]] = {side: [] for side in sides}
    for pair in pairs:
        for side, row, whole in zip(sides, objective.encode(policy.tokenizer, pair, stage.max_length,
                                                            stage.truncation_mode),
                                    objective.encode(policy.tokenizer, pair, None, stage.truncation_mode),
                                    strict=True):
            rows[side].append(row)
            full[side].append(len(whole.ids))
    logps = side_logprobs(LogProbModel(base.model, policy.tokenizer.pad_token_id or 0), rows, batch_tokens=4096)
    limit = stage.max_length if stage.max_length is not None else float("inf")
    return pd.DataFrame({
        "id": [p.id for p in pairs],
        "ref_chosen_logps": logps["chosen"], "ref_rejected_logps": logps["rejected"],
        "prompt_tokens": [len(r.ids) - sum(r.mask) for r in rows["chosen"]],
        "chosen_tokens": [sum(r.mask) for r in rows["chosen"]],
        "rejected_tokens": [sum(r.mask) for r in rows["rejected"]],
        "truncated": np.maximum(full["chosen"], full["rejected"]) > limit,
    })


def _summary(stage: StageConfig, spec: str, source: str, lm: Any, trained: Path, pairs: list[Any],
             precision: dict[str, Any], data_fp: str, versions: dict[str, Any]) -> dict[str, Any]:
    """A stage summary with what an import knows; training figures it cannot know are null."""
    kind = "adapter" if stage.finetune == "lora" else "checkpoint"
    settings = "the LoRA settings are the adapter's own" if kind == "adapter" else \
        "the DPO/KTO reference is the base model (--model)"
    return {
        "method": stage.method, "label": stage.name or f"{stage.method} (imported)",
        "steps": None, "epochs": None, "final_loss": None, "train_time_s": None, "setup_time_s": None,
        "pairs_per_s": None, "examples_per_s": None, "n_pairs": len(pairs), "n_examples": None,
        "max_length": stage.max_length, "resumed_from_step": None, "processes": None, "seed": stage.seed,
        "start_model": spec, "start_model_in_run": None, "start_source": source, "init_adapter": None,
        "base_fingerprint": None, "policy_fingerprint": lm.fingerprint, "data_fingerprint": data_fp,
        "precision": precision, "finetune": stage.finetune, "config": stage.model_dump(mode="json"),
        "reference": None,
        "imported": {kind: str(trained.resolve()),
                     "note": "trained outside alignscope: steps, loss and times are unknown; the objective's "
                             f"settings are as given at import; {settings}"},
        "versions": versions,
    }
