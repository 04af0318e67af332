"""`leadre demo`: the README's main job, end to end on the embedded synthetic ad marketplace.

It runs every pipeline step that exists so far, in order, each writing its artifact under the output folder:
data → semantic IDs → prompts → SFT → DPO → evaluation (SFT, DPO, baselines) → gate (DPO ships only if it beats
SFT) → one recall request answered by the promoted model. It says what each step produced.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from leadre.config import DEMO_CONFIG, read_config, section
from leadre.dpo import DPOSettings, train_dpo
from leadre.evaluate import evaluate
from leadre.gate import DPO_POLICY, decide, format_decision, read_evaluation
from leadre.prompts import PromptCatalogue, PromptConfig, build_prompt, build_prompts, user_timelines
from leadre.recall import LLMRecaller
from leadre.schema import read_data_dir, write_data_dir
from leadre.semantic_ids import SidSettings, build_sids, summary
from leadre.sft import TrainSettings, train_sft
from leadre.sid import load_sid_table
from leadre.split import leave_one_out
from leadre.stats import data_stats, format_stats
from leadre.synth import POSITIVE_ACTIONS, SynthConfig, generate, synth_parameters


def _step(name: str, started: float, what: str) -> None:
    print(f"[{name}] {what} ({time.perf_counter() - started:.0f}s)", flush=True)


def run_demo(out: Path, users: int = 2000, seed: int = 0, config: Path = DEMO_CONFIG) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg = read_config(config)
    source = str(config)

    t = time.perf_counter()
    synth = SynthConfig(users=users, seed=seed)
    tables = write_data_dir(generate(synth), out / "data", "data synth", synth_parameters(synth), POSITIVE_ACTIONS)
    _step("data", t, f"synthetic marketplace -> {out / 'data'}")
    print(format_stats(data_stats(tables, list(POSITIVE_ACTIONS))))

    t = time.perf_counter()
    manifest = build_sids(out / "data", out / "sids", **dataclasses.asdict(section(cfg, "sids", SidSettings, source, seed=seed)))
    _step("sids", t, f"{summary(manifest['stats'])} -> {out / 'sids'}")

    t = time.perf_counter()
    prompt_cfg = section(cfg, "prompts", PromptConfig, source, seed=seed)
    manifest = build_prompts(out / "data", out / "sids", out / "prompts", prompt_cfg)
    _step("prompts", t, f"{manifest['counts']}, train tasks {manifest['stats']['per_task']} -> {out / 'prompts'}")

    t = time.perf_counter()
    meta = train_sft(out / "prompts", out / "sids", out / "sft", "tiny", section(cfg, "sft", TrainSettings, source, seed=seed),
                     cfg.get("model") or {})
    _step("sft", t, f"{meta['model']['parameters']:,} parameters, validation Recall@10 {meta['metrics']['recall@10']:.3f} -> {out / 'sft'}")

    t = time.perf_counter()
    meta = train_dpo(out / "sft", out / "prompts", out / "data", out / "dpo", section(cfg, "dpo", DPOSettings, source, seed=seed))
    m = meta["metrics"]
    _step("dpo", t, f"{meta['pairs']} pairs, held-out preference margin {m['heldout_margin_before']:.2f} -> "
                    f"{m['heldout_margin_after']:.2f} -> {out / 'dpo'}")

    t = time.perf_counter()
    evaluate([out / "dpo", out / "sft"], out / "data", out / "sids", out / "evaluation", splits=("validation", "test"))
    _step("evaluate", t, f"metrics.md, recall_at_k.png -> {out / 'evaluation'}")
    print((out / "evaluation" / "metrics.md").read_text())

    document = read_evaluation(out / "evaluation")
    decision = decide(document, document | {"model": "sft"}, DPO_POLICY)
    promoted = "dpo" if decision.promote else "sft"
    print("[gate] DPO vs SFT: " + format_decision(decision) + f"\n[gate] promoted model: {out / promoted}")

    t = time.perf_counter()
    sids = load_sid_table(out / "sids")
    timeline = next(user_timelines(tables, leave_one_out(tables.events, POSITIVE_ACTIONS)))
    history = timeline.history(len(tables.events))  # everything the user has done so far
    prompt = build_prompt(history, PromptCatalogue.build(tables.ads, tables.contents, sids), prompt_cfg)
    active = set(tables.ads.loc[tables.ads["active"], "ad_id"])
    recalled = LLMRecaller.from_dir(out / promoted, sids, active).recall([prompt], top_n=10, beam_width=20)[0]
    ads = read_data_dir(out / "data", validate=False).ads.set_index("ad_id")
    _step("recall", t, f"user {history.user_id} ({len(history.ads)} engaged ads) -> top 10 from the {promoted} model:")
    for ad_id, score in recalled:
        print(f"    {ad_id}  {score:7.3f}  eCPM {ads.loc[ad_id, 'ecpm']:6.1f}  {ads.loc[ad_id, 'title']}")
