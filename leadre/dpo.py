"""`leadre train dpo`: direct preference optimisation of the SFT model toward higher-value ads.

Preference pairs, all from the training window (validation and test targets never appear):
- **eCPM pairs**: two ads the user engaged with whose eCPM differs by at least `min_ecpm_ratio`; the prompt is
  the user's state just before the earlier of the two (so neither is in its history); the higher eCPM is chosen.
- **generated pairs**: an engaged ad (chosen) against the best ad the SFT model generates for the same prompt
  that the user never engaged with (rejected).
At most `pairs_per_user` pairs per user, `ecpm_share` of them eCPM pairs where the user has enough.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from leadre.artifacts import read_manifest, write_artifact
from leadre.devices import describe, resolve_device, train_bf16
from leadre.model import PRESETS, add_lora, load_model, save_model
from leadre.prompts import PromptCatalogue, PromptConfig, build_prompt, user_timelines
from leadre.recall import LLMRecaller
from leadre.schema import read_data_dir, split_settings_of
from leadre.sid import load_sid_table
from leadre.tokenizer import sid_token_ids

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DPOSettings:
    """The `dpo` section of a config file."""

    beta: float = 0.1
    pairs_per_user: int = 4
    ecpm_share: float = 0.5  # share of a user's pairs that are eCPM pairs (the rest: generated negatives)
    min_ecpm_ratio: float = 1.2
    max_users: int = 2000  # users sampled for pairs (mining negatives decodes once per target)
    beam: int = 10
    epochs: float = 1.0
    batch_size: int = 16
    learning_rate: float = 5e-5
    threads: int = 2
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda (leadre.devices)
    precision: str = "auto"  # auto (bf16 autocast where the device computes bf16 natively) | bf16 | fp32

    def __post_init__(self) -> None:
        if not 0 <= self.ecpm_share <= 1:
            raise ValueError("ecpm_share must be in [0, 1]")
        if self.beta <= 0 or self.pairs_per_user < 1 or self.min_ecpm_ratio < 1:
            raise ValueError("beta must be > 0, pairs_per_user >= 1 and min_ecpm_ratio >= 1")


def ecpm_pairs(ads: list[str], ecpm: dict[str, float], n: int, min_ratio: float,
               rng: np.random.Generator) -> list[tuple[int, str, str]]:
    """Up to n (earlier index, chosen, rejected) pairs of engaged ads whose eCPMs differ by `min_ratio`, from
    random index pairs (long histories have too many pairs to list)."""
    pairs: list[tuple[int, str, str]] = []
    if len(ads) < 2:
        return pairs
    for i, j in rng.integers(len(ads), size=(20 * n, 2)):
        i, j = min(i, j), max(i, j)
        lo, hi = sorted((ads[i], ads[j]), key=ecpm.__getitem__)
        if i != j and ecpm[hi] >= min_ratio * ecpm[lo] and ecpm[hi] > ecpm[lo]:
            pairs.append((int(i), hi, lo))
            if len(pairs) == n:
                break
    return pairs


def build_pairs(data_dir: str | Path, prompts_dir: str | Path, recaller: LLMRecaller,
                settings: DPOSettings) -> list[dict[str, Any]]:
    """Preference pairs {prompt, chosen, rejected, kind, user_id} from each sampled user's training window."""
    manifest = read_manifest(prompts_dir, "prompts build")
    cfg = PromptConfig(**manifest["parameters"])
    split_settings = split_settings_of(data_dir)
    split_settings.check(manifest.get("split"), f"prompts {prompts_dir}")
    tables = read_data_dir(data_dir)
    sids = load_sid_table(manifest["inputs"]["sids"])
    split = split_settings.split(tables.events)
    cat = PromptCatalogue.build(tables.ads, tables.contents, sids)
    ecpm = dict(zip(tables.ads["ad_id"], tables.ads["ecpm"]))
    rng = np.random.default_rng(settings.seed)

    timelines = list(user_timelines(tables, split))
    timelines = [timelines[i] for i in sorted(rng.choice(len(timelines), min(settings.max_users, len(timelines)), replace=False))]
    pairs: list[dict[str, Any]] = []
    to_mine: list[tuple[dict[str, Any], set[str]]] = []  # generated pairs still without a rejected ad, and what the user engaged with
    for t in timelines:
        n_train = t.n_train
        if n_train < 1:
            continue
        train_ads = t.ads[:n_train]
        by_ecpm = ecpm_pairs(train_ads, ecpm, int(round(settings.pairs_per_user * settings.ecpm_share)),
                             settings.min_ecpm_ratio, rng)
        for i, chosen, rejected in by_ecpm:
            prompt = build_prompt(t.history(int(t.ad_pos[i])), cat, cfg)
            pairs.append({"kind": "ecpm", "user_id": t.user_id, "prompt": prompt, "chosen": cat.sid[chosen], "rejected": cat.sid[rejected]})
        n_generated = settings.pairs_per_user - len(by_ecpm)
        for i in rng.choice(n_train, size=min(n_generated, n_train), replace=False):
            prompt = build_prompt(t.history(int(t.ad_pos[i])), cat, cfg)
            pairs.append({"kind": "generated", "user_id": t.user_id, "prompt": prompt, "chosen": cat.sid[t.ads[i]], "rejected": None})
            to_mine.append((pairs[-1], set(train_ads)))

    generated = recaller.recall([p["prompt"] for p, _ in to_mine], top_n=settings.beam, beam_width=settings.beam, progress=True)
    for (pair, engaged), ranked in zip(to_mine, generated):
        best_unengaged = next((ad for ad, _ in ranked if ad not in engaged), None)
        pair["rejected"] = cat.sid[best_unengaged] if best_unengaged is not None else None
    return [p for p in pairs if p["rejected"] is not None]


def preference_margin(model, tokenizer, pairs: list[dict[str, Any]], batch_size: int = 32) -> float:
    """Mean log p(chosen | prompt) − log p(rejected | prompt): what DPO should raise."""
    margins = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        scores = {}
        for side in ("chosen", "rejected"):
            prompts = tokenizer([p["prompt"] for p in batch], add_special_tokens=False)["input_ids"]
            answers = tokenizer([p[side] for p in batch], add_special_tokens=False)["input_ids"]
            scores[side] = _sequence_logprobs(model, prompts, answers, tokenizer.pad_token_id)
        margins.append(scores["chosen"] - scores["rejected"])
    return float(torch.cat(margins).mean())


@torch.inference_mode()
def _sequence_logprobs(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> torch.Tensor:
    seqs = [p + a for p, a in zip(prompts, answers)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    logp = torch.log_softmax(model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float(), -1).cpu()
    total = torch.zeros(len(seqs))
    for i, (p, a) in enumerate(zip(prompts, answers)):
        positions = torch.arange(len(p) - 1, len(p) + len(a) - 1)
        total[i] = logp[i, positions, torch.tensor(a)].sum()
    return total


def train_dpo(model_dir: str | Path, prompts_dir: str | Path, data_dir: str | Path, out: str | Path,
              settings: DPOSettings = DPOSettings()) -> dict[str, Any]:
    """Mine pairs with the SFT model, run trl's DPO on them, write the model directory; returns its metadata."""
    device = resolve_device(settings.device)
    if device.index is not None:
        torch.cuda.set_device(device)  # the Trainer places the model on the current CUDA device
    bf16 = train_bf16(device, settings.precision)
    log.info("dpo: training on %s%s", describe(device), " with bf16 autocast" if bf16 else " in float32")
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    model, tokenizer, sft_meta = load_model(model_dir)
    split_settings_of(data_dir).check(sft_meta.get("split"), f"model {model_dir}")
    model.to(device)  # pair mining and the margins decode before the Trainer takes the model
    sids = load_sid_table(sft_meta["sids"])
    recaller = LLMRecaller.from_model(model, tokenizer, sids)
    pairs = build_pairs(data_dir, prompts_dir, recaller, settings)
    if not pairs:
        raise ValueError("no preference pairs: users need at least two engaged ads of different eCPM, or one engaged ad")
    rng = np.random.default_rng(settings.seed)
    held = set(rng.choice(len(pairs), size=max(1, len(pairs) // 10), replace=False).tolist())
    train_pairs = [p for i, p in enumerate(pairs) if i not in held]
    eval_pairs = [p for i, p in enumerate(pairs) if i in held]
    margin_before = preference_margin(model, tokenizer, eval_pairs)
    kinds = {k: sum(p["kind"] == k for p in pairs) for k in ("ecpm", "generated")}
    log.info("dpo: %d pairs (%s), held-out margin before %.3f", len(pairs), kinds, margin_before)

    policy = model.train()
    if sft_meta["base"] not in PRESETS:  # a pretrained base: LoRA again, with the S-ID rows trainable
        policy = add_lora(model, np.concatenate(sid_token_ids(tokenizer, sft_meta["level_sizes"])).tolist(), {})
    columns = ("prompt", "chosen", "rejected")
    args = DPOConfig(
        output_dir=str(Path(out).parent / f"{Path(out).name}.work"),
        beta=settings.beta,
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        eval_strategy="epoch",
        save_strategy="no",
        logging_steps=max(1, math.ceil(len(train_pairs) / settings.batch_size / 10)),
        report_to="none",
        bf16=bf16,
        gradient_checkpointing=False,
        use_cpu=device.type == "cpu",
        seed=settings.seed,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=copy.deepcopy(model).eval() if policy is model else None,
        args=args,
        train_dataset=Dataset.from_list([{c: p[c] for c in columns} for p in train_pairs]),
        eval_dataset=Dataset.from_list([{c: p[c] for c in columns} for p in eval_pairs]),
        processing_class=tokenizer,
    )
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    trained = trainer.model.eval()
    margin_after = preference_margin(trained, tokenizer, eval_pairs)
    log.info("dpo: held-out margin %.3f -> %.3f in %.0fs", margin_before, margin_after, wall)

    parameters = {"settings": dataclasses.asdict(settings)}
    with write_artifact(out, "train dpo", {"model": model_dir, "prompts": prompts_dir, "data": data_dir}, parameters) as (tmp, manifest):
        metadata = save_model(trained, tokenizer, tmp, {
            **{k: sft_meta[k] for k in ("base", "level_sizes", "prompts", "sids", "data_version", "prompt_config",
                                        "split")
               if k in sft_meta},
            "stage": "dpo",
            "sft_model": str(model_dir),
            "metrics": {"heldout_margin_before": margin_before, "heldout_margin_after": margin_after},
            "pairs": kinds,
            "training": {"steps": trainer.state.global_step, "wall_seconds": round(wall, 1),
                         "precision": "bf16" if bf16 else "fp32"},
        })
        (tmp / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
        with open(tmp / "pairs.jsonl", "w") as f:
            for p in pairs:
                f.write(json.dumps(p) + "\n")
        manifest["split"] = metadata["split"]
        manifest["counts"] = {"pairs": len(pairs), **kinds, "steps": trainer.state.global_step}
        manifest["metrics"] = metadata["metrics"]
    return metadata
