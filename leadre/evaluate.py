"""`leadre evaluate`: offline metrics of LLM recallers and baselines on the leave-one-out split.

Every model and baseline sees the same users (all evaluated users of the split, unless `users` asks for a seeded
sample), targets and histories; an LLM reads each user's plain next-ad prompt (built with the prompt settings it
was trained with) and decodes over the trie of active ads, seen ads excluded inside the search in the
`seen_excluded` variant. Besides the metrics, an evaluation records bootstrap intervals, the per-user values
behind every mean (the gate's paired test reads them) and its protocol: the fingerprints of the data, S-IDs and
users, the split settings and the search, which the data, S-IDs and models must all agree on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from leadre.artifacts import read_manifest, write_artifact
from leadre.baselines import CoOccurrence, Popularity
from leadre.devices import inference_dtype, resolve_device
from leadre.gate import write_evaluation
from leadre.metrics import (KS, VARIANTS, Catalogue, Recalled, Recaller, rank_intervals, rank_recaller, summarize,
                            user_histories, user_values)
from leadre.model import load_model
from leadre.prompts import PromptCatalogue, PromptConfig, eval_examples
from leadre.recall import LLMRecaller
from leadre.schema import read_data_dir, split_settings_of
from leadre.sid import load_sid_table

log = logging.getLogger(__name__)
BASELINES = ("popularity", "cooccurrence")


def llm_recaller(recaller: LLMRecaller, beam: int, renormalize: bool = False):
    """The `leadre.metrics.Recaller` of an LLM: its inputs are the users' prompts."""

    def recall(prompts: Sequence[str], n: int, exclude: Sequence[Collection[str]] | None = None) -> Recalled:
        ranked = recaller.recall(prompts, top_n=n, beam_width=max(beam, n), exclude=exclude, progress=True,
                                 renormalize=renormalize)
        return Recalled(ad_ids=[[ad for ad, _ in r] for r in ranked], scores=[[s for _, s in r] for r in ranked])

    return recall


def model_names(metadata: Sequence[dict[str, Any]], model_dirs: Sequence[Path]) -> list[str]:
    """A model is named by its stage ('sft', 'dpo'), or by its directory where that name is taken."""
    names: list[str] = []
    for meta, model_dir in zip(metadata, model_dirs):
        name = meta.get("stage", model_dir.name)
        names.append(model_dir.name if name in names or name in BASELINES else name)
    return names


def evaluate(model_dirs: Sequence[str | Path], data_dir: str | Path, sids_dir: str | Path, out: str | Path,
             splits: Sequence[str] = ("validation",), beam: int = 50, users: int | None = None,
             variants: Sequence[str] = VARIANTS, baselines: Sequence[str] = BASELINES, seed: int = 0,
             names: Sequence[str] | None = None, renormalize: bool = False, device: str = "auto") -> dict[str, Any]:
    """Evaluate every model (the first is the one `leadre gate` compares) and the baselines; returns the results.
    Models are named by `names`, or by their stage ('sft', 'dpo'); they decode on `device` (leadre.devices)."""
    target = resolve_device(device)
    model_dirs = [Path(m) for m in model_dirs]
    models = [load_model(m) for m in model_dirs]
    for model, _, _ in models:
        model.to(target, dtype=inference_dtype(target))
    names = list(names) if names is not None else model_names([m[2] for m in models], model_dirs)
    tables = read_data_dir(data_dir)
    split_settings = split_settings_of(data_dir)
    split_settings.check(read_manifest(sids_dir).get("split"), f"S-IDs {sids_dir}")
    for model_dir, (_, _, meta) in zip(model_dirs, models):
        split_settings.check(meta.get("split"), f"model {model_dir}")
    sids = load_sid_table(sids_dir)
    split = split_settings.split(tables.events)
    catalogue = Catalogue.from_ads(tables.ads)
    active = set(tables.ads.loc[tables.ads["active"], "ad_id"])
    prompt_catalogue = PromptCatalogue.build(tables.ads, tables.contents, sids)
    fitted = {"popularity": Popularity.fit(split, catalogue), "cooccurrence": CoOccurrence.fit(split, catalogue)}
    # what another evaluation must share to be compared with this one (`leadre.gate.check_comparable`)
    protocol: dict[str, Any] = {
        "data": fingerprint(tables.ads, tables.contents, tables.users, tables.events),
        "sids": fingerprint(sids.frame(), pd.DataFrame({"level_size": sids.level_sizes})),
        "split": split_settings.as_dict(), "users": {},
        # bfloat16 reorders near-ties (bench/README.md): the decoding precision is part of the protocol
        "search": {"beam": beam, "renormalize": renormalize, "dtype": str(inference_dtype(target)).removeprefix("torch.")}}

    results: dict[str, dict[str, Any]] = {}
    intervals: dict[str, dict[str, Any]] = {}
    per_user: list[pd.DataFrame] = []
    timings: dict[str, float] = {}
    for which in splits:
        targets, histories = user_histories(split, which)
        if users is not None and users < len(targets):
            keep = np.sort(np.random.default_rng(seed).choice(len(targets), users, replace=False))
            targets, histories = targets.iloc[keep], [histories[i] for i in keep]
        target_ads = targets["ad_id"].tolist()
        protocol["users"][which] = {"count": len(targets), "sample": users, "seed": seed,
                                    "fingerprint": fingerprint(targets[["user_id", "ad_id", "pos"]])}
        recallers: dict[str, tuple[Recaller, Sequence[Any] | None]] = {}
        prompts: dict[str, list[str]] = {}  # per prompt config: the models' own prompt settings
        for (model, tokenizer, meta), name in zip(models, names):
            cfg = PromptConfig(**meta.get("prompt_config", {}))
            key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
            if key not in prompts:
                examples = eval_examples(tables, split, which, prompt_catalogue, cfg)
                prompts[key] = [examples[u]["prompt"] for u in targets["user_id"]]
            recallers[name] = (llm_recaller(LLMRecaller.from_model(model, tokenizer, sids, active), beam, renormalize),
                               prompts[key])
        recallers |= {name: (fitted[name], None) for name in baselines}
        for name, (recaller, inputs) in recallers.items():
            started = time.perf_counter()
            ranked = rank_recaller(recaller, histories, target_ads, catalogue, max(KS), variants, inputs=inputs)
            timings[f"{name}/{which}"] = time.perf_counter() - started
            for variant, r in ranked.items():
                results.setdefault(name, {}).setdefault(which, {})[variant] = summarize(r, catalogue, KS)
                intervals.setdefault(name, {}).setdefault(which, {})[variant] = rank_intervals(r.ranks, KS, seed=seed)
                per_user.append(pd.DataFrame({"model": name, "split": which, "variant": variant,
                                              "user_id": targets["user_id"].to_numpy(),
                                              **user_values(r, catalogue, KS)}))
            log.info("evaluate: %s on %s: %s", name, which, {v: round(m["recall@10"], 4) for v, m in results[name][which].items()})
    evaluated = names[0] if names else next(iter(results))
    parameters = {"splits": list(splits), "beam": beam, "users": users, "variants": list(variants), "seed": seed,
                  "renormalize": renormalize, "device": str(target)}
    inputs = {"data": data_dir, "sids": sids_dir} | {f"model_{i}": m for i, m in enumerate(model_dirs)}
    with write_artifact(out, "evaluate", inputs, parameters) as (tmp, manifest):
        write_evaluation(tmp, results, evaluated, KS, intervals, pd.concat(per_user, ignore_index=True), protocol)
        (tmp / "timings.json").write_text(json.dumps({k: round(v, 2) for k, v in timings.items()}, indent=2) + "\n")
        manifest["model"] = evaluated
        manifest["split"] = split_settings.as_dict()
        manifest["protocol"] = protocol
        manifest["counts"] = {"models": len(results), **{f"users_{w}": results[evaluated][w][variants[0]]["users"] for w in splits}}
    return {"model": evaluated, "results": results, "intervals": intervals, "protocol": protocol}


def fingerprint(*frames: pd.DataFrame) -> str:
    """SHA-256 of the tables' contents (column names and row hashes, not file bytes or manifests): equal for the
    same data, S-IDs or users however and wherever they were written."""
    digest = hashlib.sha256()
    for frame in frames:
        digest.update("\x1f".join(map(str, frame.columns)).encode() + b"\x1e")
        digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()
