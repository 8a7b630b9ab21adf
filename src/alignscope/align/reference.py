"""Reference log-prob cache: the reference model's summed log-probs of chosen and rejected, once.

DPO-style losses compare the policy with a frozen reference on every pair. TRL can precompute the
reference log-probs (``DPOConfig.precompute_ref_log_probs``) but only for the lifetime of one
trainer (an HF-datasets temp file keyed by TRL's own hash). Here they become an artefact of the run
directory, ``RUN/reference/<key>/ref_logps.parquet``, keyed by everything that determines them:

- the reference model's fingerprint (weights incl. dtype, vocabulary, chat template),
- the preference data's fingerprint,
- the tokenisation settings (``max_length``, ``truncation_mode``, the chat template text), the
  LD-DPO ``ld_alpha`` weighting and the mixed-precision mode of the forward pass.

So a rerun, a resumed run, a second stage with other loss settings on the same reference, and the
later diagnostics (implicit rewards) and attribution all read the same numbers.

Rows are also reused *across data sets*: each row carries ``tokens_hash``, a hash of the pair's
prompt/chosen/rejected token ids, which (with the reference and tokenisation settings in the key)
fully determines its log-probs. A stage on a subset of earlier data — curation's "retrain without
the top-k pairs" — finds its rows in the earlier table and computes only pairs never seen.

How it plugs into TRL 1.16 (``trl/trainer/dpo_trainer.py``): with ``precompute_ref_log_probs=True``
the trainer calls ``self._precompute_ref_logps(train_dataset, "train", batch_size)`` at the end of
``__init__`` (line 1014) on the dataset its ``_prepare_dataset`` (1036; ``tokenize_fn`` 1075, the
drop of prompts that fill ``max_length`` 1140) has already tokenised into ``prompt_ids`` /
``chosen_ids`` / ``rejected_ids``; ``_compute_loss`` then reads ``inputs["ref_chosen_logps"]`` /
``inputs["ref_rejected_logps"]`` instead of running the reference (1318–1319). The collator
passes those columns through (``DataCollatorForPreference.torch_call``, 177 and 203) and
``_set_signature_columns_if_needed`` keeps them (1144–1164). ``CachedReferenceDPOTrainer``
overrides only ``_precompute_ref_logps`` (TRL's is at 1168): on a cache hit it attaches the stored
columns by pair id; on a miss it runs TRL's own loop — TRL's collator (its truncation), TRL's
``compute_ref_log_probs`` (1243: adapter disabled / initial weights, no grad, TRL's autocast) and
``accelerator.gather_for_metrics`` — and stores the result, so the numbers are TRL's own. (TRL's
version writes an HF-datasets temp file per process, which is also why it cannot be shared.)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from alignscope.errors import InputError
from alignscope.store import DONE_MARKER, RunDir, atomic_write_json, atomic_write_parquet

REFERENCE_STAGE = "reference"
REFERENCE_FILE = "ref_logps.parquet"
COLUMNS = ("id", "ref_chosen_logps", "ref_rejected_logps", "prompt_tokens", "chosen_tokens",
           "rejected_tokens", "truncated")
TOKENS_HASH = "tokens_hash"  # optional column (tables written before it existed lack it)


def chat_template_hash(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    return hashlib.blake2b(str(template).encode(), digest_size=8).hexdigest()


def reference_inputs(reference_fingerprint: str, data_fingerprint: str, *, max_length: int | None,
                     truncation_mode: str, chat_template: str, ld_alpha: float | None = None,
                     mixed_precision: str = "no") -> dict[str, Any]:
    """The cache key inputs: reference identity, data identity, and how sequences were built."""
    return {
        "stage": REFERENCE_STAGE,
        "reference": reference_fingerprint,
        "data": data_fingerprint,
        "tokenisation": {"max_length": max_length, "truncation_mode": truncation_mode,
                         "chat_template": chat_template, "format": "trl-dpo-conversational"},
        "ld_alpha": ld_alpha,
        "mixed_precision": mixed_precision,
    }


class ReferenceStore:
    """One reference log-prob table in a run directory (find / write / read)."""

    def __init__(self, run: RunDir | Path | str, inputs: dict[str, Any]) -> None:
        self.run = run if isinstance(run, RunDir) else RunDir(run)
        self.inputs = inputs
        self.computed_s: float | None = None  # seconds spent computing (None: served from the cache)
        self.was_hit: bool | None = None

    @property
    def path(self) -> Path:
        return self.run.path(REFERENCE_STAGE, self.inputs) / REFERENCE_FILE

    def load(self) -> pd.DataFrame | None:
        found = self.run.find(REFERENCE_STAGE, self.inputs)
        return read_reference(found.file(REFERENCE_FILE)) if found is not None else None

    def reusable_rows(self) -> pd.DataFrame | None:
        """Rows stored for *other* data under the same reference and tokenisation, by token hash."""
        family = {k: v for k, v in self.inputs.items() if k != "data"}
        frames = []
        for inputs_file in sorted((self.run.root / REFERENCE_STAGE).glob("*/inputs.json")):
            table = inputs_file.parent / REFERENCE_FILE
            if not (inputs_file.parent / DONE_MARKER).exists() or not table.exists():
                continue
            other = json.loads(inputs_file.read_text())
            if {k: v for k, v in other.items() if k != "data"} == family:
                frame = pd.read_parquet(table)
                if TOKENS_HASH in frame:
                    frames.append(frame)
        if not frames:
            return None
        return pd.concat(frames, ignore_index=True).drop_duplicates(TOKENS_HASH).set_index(TOKENS_HASH)

    def save(self, frame: pd.DataFrame, meta: dict[str, Any]) -> Path:
        columns = list(COLUMNS) + ([TOKENS_HASH] if TOKENS_HASH in frame else [])
        with self.run.build(REFERENCE_STAGE, self.inputs) as scratch:
            atomic_write_parquet(scratch / REFERENCE_FILE, frame[columns])
            atomic_write_json(scratch / "summary.json", {"n_pairs": len(frame), **meta})
        return self.path


def read_reference(path: str | Path) -> pd.DataFrame:
    """Read a stored reference table (one row per pair: id, ref_chosen_logps, ref_rejected_logps, …)."""
    path = Path(path)
    if path.is_dir():
        path = path / REFERENCE_FILE
    if not path.exists():
        raise InputError(f"reference cache {path}: no such file")
    frame = pd.read_parquet(path)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"reference cache {path}: missing columns {missing}")
    return frame


def stage_reference(stage_dir: str | Path) -> pd.DataFrame | None:
    """The reference table a finished DPO/IPO stage trained against (None for other methods)."""
    import json

    summary = json.loads((Path(stage_dir) / "summary.json").read_text())
    ref = summary.get("reference")
    if not ref:
        return None
    return read_reference(Path(stage_dir).parents[1] / ref["path"])


def token_counts(dataset: Any, max_length: int | None) -> pd.DataFrame:
    """Per-pair token counts of a TRL-tokenised preference dataset, and whether TRL truncates it."""
    prompt = [len(x) for x in dataset["prompt_ids"]]
    chosen = [len(x) for x in dataset["chosen_ids"]]
    rejected = [len(x) for x in dataset["rejected_ids"]]
    limit = max_length if max_length is not None else float("inf")
    truncated = [p + max(c, r) > limit for p, c, r in zip(prompt, chosen, rejected, strict=True)]
    hashes = [_tokens_hash(p, c, r) for p, c, r in
              zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)]
    return pd.DataFrame({"id": [str(x) for x in dataset["id"]], "prompt_tokens": prompt,
                         "chosen_tokens": chosen, "rejected_tokens": rejected, "truncated": truncated,
                         TOKENS_HASH: hashes})


def _tokens_hash(prompt: Any, chosen: Any, rejected: Any) -> str:
    digest = hashlib.blake2b(digest_size=12)
    for part in (prompt, chosen, rejected):
        digest.update(json.dumps([int(t) for t in part]).encode())
        digest.update(b"|")
    return digest.hexdigest()


def _dpo_trainer_class() -> type:
    from trl import DPOTrainer

    return DPOTrainer


def make_cached_reference_trainer(base: type | None = None) -> type:
    """A DPOTrainer subclass whose reference log-probs come from (and go to) a ``ReferenceStore``."""
    base = base or _dpo_trainer_class()

    class CachedReferenceDPOTrainer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, reference_store: ReferenceStore | None = None, **kwargs: Any) -> None:
            # Set before TRL's __init__, which calls _precompute_ref_logps at its end.
            self._reference_store = reference_store
            super().__init__(*args, **kwargs)

        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            store = self._reference_store
            if store is None or name != "train" or "id" not in dataset.column_names:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            counts = token_counts(dataset, self.args.max_length)
            frame = store.load()
            if frame is not None and set(counts["id"]) <= set(frame["id"]):
                store.was_hit = True
            else:
                frame = self._fill_reference(dataset, counts, store, batch_size)
            by_id = frame.set_index("id")
            rows = by_id.loc[counts["id"]]
            dataset = dataset.add_column("ref_chosen_logps", rows["ref_chosen_logps"].astype("float32").tolist())
            return dataset.add_column("ref_rejected_logps", rows["ref_rejected_logps"].astype("float32").tolist())

        def _fill_reference(self, dataset: Any, counts: pd.DataFrame, store: ReferenceStore,
                            batch_size: int) -> pd.DataFrame:
            """Reuse rows known by token hash; compute the rest with TRL's loop; store the table."""
            known = store.reusable_rows()
            chosen = pd.Series(float("nan"), index=counts.index)
            rejected = chosen.copy()
            if known is not None:
                seen = counts[TOKENS_HASH].isin(known.index)
                chosen[seen] = known.loc[counts.loc[seen, TOKENS_HASH], "ref_chosen_logps"].to_numpy()
                rejected[seen] = known.loc[counts.loc[seen, TOKENS_HASH], "ref_rejected_logps"].to_numpy()
            missing = [int(i) for i in chosen.index[chosen.isna()]]
            started = time.perf_counter()
            if missing:
                c, r = self._reference_forward(dataset.select(missing), batch_size)
                chosen[missing], rejected[missing] = c.double().numpy(), r.double().numpy()
            store.computed_s = time.perf_counter() - started if missing else None
            store.was_hit = not missing
            frame = counts.assign(ref_chosen_logps=chosen.to_numpy(), ref_rejected_logps=rejected.to_numpy())
            if self.accelerator.is_main_process:
                store.save(frame, {"seconds": round(time.perf_counter() - started, 3), "batch_size": batch_size,
                                   "processes": self.accelerator.num_processes, "computed": len(missing),
                                   "reused": len(counts) - len(missing)})
            self.accelerator.wait_for_everyone()
            return frame

        def _reference_forward(self, dataset: Any, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
            """TRL's own precompute loop (DPOTrainer._precompute_ref_logps), minus its temp-file cache."""
            from accelerate.utils import tqdm
            from torch.utils.data import DataLoader

            if self.is_deepspeed_enabled and self.ref_model is None:
                raise InputError("the reference cache does not support DeepSpeed yet; set "
                                 "precompute_ref_log_probs: false")
            loader = self.accelerator.prepare(DataLoader(
                dataset, batch_size=batch_size, collate_fn=self.data_collator,
                num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
                shuffle=False,
            ))
            model = self.ref_model or self.model
            chosen, rejected = [], []
            for batch in tqdm(iterable=loader, desc="Reference log-probs (cached in the run directory)",
                              disable=bool(os.environ.get("TQDM_DISABLE", ""))):
                c, r = self.compute_ref_log_probs(model, batch)
                c, r = self.accelerator.gather_for_metrics((c, r))
                chosen.append(c.float().cpu())
                rejected.append(r.float().cpu())
            return torch.cat(chosen), torch.cat(rejected)

    return CachedReferenceDPOTrainer
