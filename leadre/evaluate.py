"""`leadre evaluate`: offline metrics of LLM recallers and baselines on the leave-one-out split.

Every model and baseline sees the same users, targets and histories; the LLM reads each user's plain next-ad
prompt (built with the prompt settings the model was trained with) and decodes over the trie of active ads.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from leadre.artifacts import write_artifact
from leadre.baselines import CoOccurrence, Popularity
from leadre.gate import write_evaluation
from leadre.metrics import KS, VARIANTS, Catalogue, Recalled, evaluate_recaller, user_histories
from leadre.model import load_model
from leadre.prompts import PromptCatalogue, PromptConfig, eval_examples
from leadre.recall import LLMRecaller
from leadre.schema import positive_actions_of, read_data_dir
from leadre.sid import load_sid_table
from leadre.split import leave_one_out

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
             names: Sequence[str] | None = None, renormalize: bool = False) -> dict[str, Any]:
    """Evaluate every model (the first is the one `leadre gate` compares) and the baselines; returns the results.
    Models are named by `names`, or by their stage ('sft', 'dpo')."""
    model_dirs = [Path(m) for m in model_dirs]
    models = [load_model(m) for m in model_dirs]
    names = list(names) if names is not None else model_names([m[2] for m in models], model_dirs)
    first_meta = models[0][2] if models else {}
    cfg = PromptConfig(**first_meta.get("prompt_config", {}))
    tables = read_data_dir(data_dir)
    sids = load_sid_table(sids_dir)
    split = leave_one_out(tables.events, positive_actions_of(data_dir), cfg.min_positives)
    catalogue = Catalogue.from_ads(tables.ads)
    active = set(tables.ads.loc[tables.ads["active"], "ad_id"])
    prompt_catalogue = PromptCatalogue.build(tables.ads, tables.contents, sids)
    fitted = {"popularity": Popularity.fit(split, catalogue), "cooccurrence": CoOccurrence.fit(split, catalogue)}

    results: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    for which in splits:
        targets, histories = user_histories(split, which)
        if users is not None and users < len(targets):
            keep = np.sort(np.random.default_rng(seed).choice(len(targets), users, replace=False))
            targets, histories = targets.iloc[keep], [histories[i] for i in keep]
        target_ads = targets["ad_id"].tolist()
        for name in baselines:
            started = time.perf_counter()
            results.setdefault(name, {})[which] = evaluate_recaller(fitted[name], histories, target_ads, catalogue, variants=variants)
            timings[f"{name}/{which}"] = time.perf_counter() - started
        if models:
            examples = eval_examples(tables, split, which, prompt_catalogue, cfg)
            prompts = [examples[u]["prompt"] for u in targets["user_id"]]
        for (model, tokenizer, _), name in zip(models, names):
            recaller = LLMRecaller.from_model(model, tokenizer, sids, active)
            started = time.perf_counter()
            results.setdefault(name, {})[which] = evaluate_recaller(llm_recaller(recaller, beam, renormalize), histories, target_ads,
                                                                    catalogue, variants=variants, inputs=prompts)
            timings[f"{name}/{which}"] = time.perf_counter() - started
            log.info("evaluate: %s on %s: %s", name, which, {v: round(m["recall@10"], 4) for v, m in results[name][which].items()})
    evaluated = names[0] if names else next(iter(results))
    parameters = {"splits": list(splits), "beam": beam, "users": users, "variants": list(variants), "seed": seed,
                  "renormalize": renormalize}
    inputs = {"data": data_dir, "sids": sids_dir} | {f"model_{i}": m for i, m in enumerate(model_dirs)}
    with write_artifact(out, "evaluate", inputs, parameters) as (tmp, manifest):
        write_evaluation(tmp, results, evaluated, KS)
        (tmp / "timings.json").write_text(json.dumps({k: round(v, 2) for k, v in timings.items()}, indent=2) + "\n")
        manifest["model"] = evaluated
        manifest["counts"] = {"models": len(results), **{f"users_{w}": results[evaluated][w][variants[0]]["users"] for w in splits}}
    return {"model": evaluated, "results": results}
