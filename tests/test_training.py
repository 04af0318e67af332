"""SFT, DPO and evaluation on the `tiny` preset: real training, real decoding, small data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from trl import SFTConfig

from leadre.artifacts import read_manifest
from leadre.cli import main
from leadre.dpo import DPOSettings, build_pairs, preference_margin, train_dpo
from leadre.evaluate import evaluate
from leadre.gate import read_evaluation
from leadre.model import load_model
from leadre.prompts import build_prompts, read_prompts
from leadre.recall import LLMRecaller
from leadre.schema import read_data_dir, split_settings_of, write_data_dir
from leadre.sft import RecallSFTTrainer, TrainSettings, mix_examples, tokenize_examples
from leadre.sid import load_sid_table
from leadre.split import SplitMismatch


def test_sft_lowers_the_loss_and_keeps_the_best_checkpoint(tiny_sft_dir: Path) -> None:
    meta = json.loads((tiny_sft_dir / "leadre_model.json").read_text())
    history = json.loads((tiny_sft_dir / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) >= 3 and losses[-1] < 0.7 * losses[0]
    recalls = [h["eval_recall@10"] for h in history if "eval_recall@10" in h]
    assert meta["best_validation_recall@10"] == max(recalls[:-1])  # the last entry is the final evaluation
    assert meta["metrics"]["recall@10"] == pytest.approx(meta["best_validation_recall@10"])
    assert meta["stage"] == "sft" and meta["model"]["parameters"] < 1_000_000
    assert (tiny_sft_dir / "loss_curves.png").stat().st_size > 10_000
    assert list(tiny_sft_dir.glob("*.safetensors")) and not list(tiny_sft_dir.glob("*.bin"))
    assert not (tiny_sft_dir.parent / "sft.work").exists()


def test_loss_is_on_the_response_only(tiny_prompts_dir: Path, tiny_sft_dir: Path) -> None:
    _, tokenizer, _ = load_model(tiny_sft_dir)
    examples = read_prompts(tiny_prompts_dir, "train")[:50]
    ds = tokenize_examples(examples, tokenizer)
    for e, ids, mask in zip(examples, ds["input_ids"], ds["completion_mask"]):
        response = [t for t, m in zip(ids, mask) if m]
        assert tokenizer.decode(response) == e["completion"]
        assert tokenizer.decode(ids) == e["prompt"] + e["completion"]


def test_training_loss_sums_response_tokens_over_a_fixed_count(tiny_prompts_dir: Path, tiny_sids_dir: Path,
                                                               tiny_sft_dir: Path, tmp_path: Path) -> None:
    """The SFT loss is the summed negative log-likelihood of the response tokens over the per-batch response-token
    count of the epoch, whatever the batch: checked against a cross-entropy computed here, and for a batch whose
    own token count differs from that count."""
    model, tokenizer, _ = load_model(tiny_sft_dir)
    ds = tokenize_examples(read_prompts(tiny_prompts_dir, "train")[:8], tokenizer)
    per_batch = 1000.0
    trainer = RecallSFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path), completion_only_loss=True,
                                                           use_cpu=True, report_to="none"),
                               train_dataset=ds, processing_class=tokenizer, sids=load_sid_table(tiny_sids_dir),
                               recall_examples=[], beam=4, response_tokens_per_batch=per_batch)
    batch = next(iter(trainer.get_train_dataloader()))  # all 8 examples, prepared as training prepares them
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="sum")
    assert (labels != -100).sum() == sum(sum(m) for m in ds["completion_mask"]) != per_batch
    assert loss.item() == pytest.approx(nll.item() / per_batch, rel=1e-4)
    assert loss.requires_grad


def test_mix_ratios() -> None:
    examples = [{"task": "stream", "i": i} for i in range(10)] + [{"task": "explicit", "i": i} for i in range(10)]
    mixed = mix_examples(examples, {"stream": 2.0, "explicit": 0.5}, seed=0)
    assert sum(e["task"] == "stream" for e in mixed) == 20 and sum(e["task"] == "explicit" for e in mixed) == 5
    with pytest.raises(ValueError, match="unknown tasks"):
        TrainSettings(mix={"streams": 1.0})


def test_resume_after_a_crash(tiny_prompts_dir: Path, tiny_sids_dir: Path, tmp_path: Path) -> None:
    """Kill a real training process after its first checkpoint; the rerun continues from that checkpoint."""
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  bpe_vocab_size: 600\nsft:\n  epochs: 3\n  batch_size: 16\n  evals_per_epoch: 2\n"
                      "  eval_users: 10\n  beam: 5\n  threads: 1\n")
    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "leadre.cli", "train", "sft", "--prompts", str(tiny_prompts_dir), "--sids",
           str(tiny_sids_dir), "--out", str(out), "--config", str(config)]
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    log = tmp_path / "first-run.log"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)
    checkpoints = tmp_path / "model.work" / "checkpoints"
    deadline = time.time() + 300
    while not list(checkpoints.glob("checkpoint-*/trainer_state.json")) and time.time() < deadline:
        assert proc.poll() is None, "training ended before writing a checkpoint: " + log.read_text()[-3000:]
        time.sleep(0.5)
    time.sleep(1.0)  # let the checkpoint finish writing its last file
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing half-written
    last = max(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    saved = json.loads((checkpoints / f"checkpoint-{last}" / "trainer_state.json").read_text())
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from {checkpoints}/checkpoint-{last}\n" in done.stderr
    meta = json.loads((out / "leadre_model.json").read_text())
    assert meta["training"]["resumed_from"] == str(checkpoints / f"checkpoint-{last}")
    # the resumed run carries the checkpoint's history and goes on past it, to the end of the schedule
    history = json.loads((out / "log_history.json").read_text())
    assert history[:len(saved["log_history"])] == saved["log_history"]
    assert meta["training"]["steps"] == saved["max_steps"] > last


def test_dpo_moves_the_policy_toward_chosen(tiny_data_dir: Path, tiny_prompts_dir: Path, tiny_sft_dir: Path,
                                            tmp_path: Path) -> None:
    settings = DPOSettings(max_users=60, pairs_per_user=4, batch_size=16, learning_rate=2e-4, epochs=2, threads=1)
    meta = train_dpo(tiny_sft_dir, tiny_prompts_dir, tiny_data_dir, tmp_path / "dpo", settings)
    assert meta["stage"] == "dpo" and meta["pairs"]["ecpm"] > 0 and meta["pairs"]["generated"] > 0
    assert meta["metrics"]["heldout_margin_after"] > meta["metrics"]["heldout_margin_before"]
    # The pairs: higher eCPM chosen; generated negatives are ads the user never engaged with.
    ads = read_data_dir(tiny_data_dir).ads
    sids = load_sid_table(meta["sids"])
    ecpm = {sids.sid_of(a): e for a, e in zip(ads["ad_id"], ads["ecpm"])}
    pairs = [json.loads(line) for line in (tmp_path / "dpo" / "pairs.jsonl").read_text().splitlines()]
    assert all(ecpm[p["chosen"]] > ecpm[p["rejected"]] for p in pairs if p["kind"] == "ecpm")
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    # Measured on the DPO model directly: the margin it raised is the one on the pairs it trained on too.
    model, tokenizer, _ = load_model(tmp_path / "dpo")
    sft_model, _, _ = load_model(tiny_sft_dir)
    assert preference_margin(model, tokenizer, pairs[:64]) > preference_margin(sft_model, tokenizer, pairs[:64])


def test_generated_negatives_are_never_engaged(tiny_data_dir: Path, tiny_prompts_dir: Path, tiny_sft_dir: Path) -> None:
    model, tokenizer, meta = load_model(tiny_sft_dir)
    recaller = LLMRecaller.from_model(model, tokenizer, load_sid_table(meta["sids"]))
    pairs = build_pairs(tiny_data_dir, tiny_prompts_dir, recaller, DPOSettings(max_users=30, ecpm_share=0.0))
    split = split_settings_of(tiny_data_dir).split(read_data_dir(tiny_data_dir).events)
    engaged = split.train_targets().groupby("user_id")["item_id"].agg(set).to_dict()
    sids = load_sid_table(meta["sids"])
    assert pairs and all(p["kind"] == "generated" for p in pairs)
    for p in pairs:
        rejected = sids.ad_of([int(c) for c in __import__("re").findall(r"_(\d+)>", p["rejected"])])
        assert rejected not in engaged[p["user_id"]]


def test_evaluate_and_gate(tiny_data_dir: Path, tiny_sids_dir: Path, tiny_sft_dir: Path, tiny_prompts_dir: Path,
                           tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tiny_sft_dir), "--data", str(tiny_data_dir), "--sids", str(tiny_sids_dir),
                 "--out", str(out), "--split", "both", "--beam", "50"]) == 0
    doc = read_evaluation(out)
    per_user = doc.pop("per_user")
    split = split_settings_of(tiny_data_dir).split(read_data_dir(tiny_data_dir).events)
    n_users = int((split.users["test_pos"] >= 0).sum())  # every evaluated user, no sample
    assert doc["model"] == "sft" and set(doc["results"]) == {"sft", "popularity", "cooccurrence"}
    assert doc["protocol"]["users"]["validation"]["count"] == n_users and doc["protocol"]["split"] == split_settings_of(
        tiny_data_dir).as_dict()
    for split_name in ("validation", "test"):
        assert list(doc["results"]["sft"][split_name]) == ["seen_excluded", "seen_kept"]
        for variant in ("seen_kept", "seen_excluded"):
            m = doc["results"]["sft"][split_name][variant]
            rows = per_user[(per_user["model"] == "sft") & (per_user["split"] == split_name)
                            & (per_user["variant"] == variant)]
            assert m["users"] == len(rows) == n_users and m["invalid_id_rate"] == 0.0
            assert m["list_length"] == 50.0  # full lists, seen ads excluded or not
            assert m["recall@10"] == pytest.approx(((rows["rank"] >= 0) & (rows["rank"] < 10)).mean())
            low, high = doc["intervals"]["sft"][split_name][variant]["recall@10"]
            assert low <= m["recall@10"] <= high and high - low < 0.25
    # The evaluation's ranks against decoding the prompts artifact's validation examples directly, seen excluded
    # (all users in the evaluation's order: the same batches, so near-ties break alike).
    examples = {e["user_id"]: e for e in read_prompts(tiny_prompts_dir, "validation")}
    model, tokenizer, meta = load_model(tiny_sft_dir)
    ads = read_data_dir(tiny_data_dir).ads
    recaller = LLMRecaller.from_model(model, tokenizer, load_sid_table(meta["sids"]), set(ads.loc[ads["active"], "ad_id"]))
    rows = per_user[(per_user["model"] == "sft") & (per_user["split"] == "validation")
                    & (per_user["variant"] == "seen_excluded")]
    chosen = [examples[u] for u in rows["user_id"]]
    ranked = recaller.recall([e["prompt"] for e in chosen], top_n=50, beam_width=50, exclude=[e["seen"] for e in chosen])
    direct = [next((i for i, (ad, _) in enumerate(r) if ad == e["target"]), -1) for r, e in zip(ranked, chosen)]
    assert rows["rank"].tolist() == direct
    # Popularity, seen kept, from the training positives by hand.
    targets = split.targets("test")
    counts = split.train_targets()["item_id"].value_counts()
    active = ads.loc[ads["active"], "ad_id"].to_numpy()
    top10 = set(active[np.argsort(-pd.Series(active).map(counts).fillna(0).to_numpy(), kind="stable")[:10]])
    assert doc["results"]["popularity"]["test"]["seen_kept"]["recall@10"] == pytest.approx(
        targets["ad_id"].isin(top10).mean())
    assert (out / "recall_at_k.png").is_file() and "| recall@10 |" in (out / "metrics.md").read_text()

    capsys.readouterr()
    assert main(["gate", "--candidate", str(out), "--current", str(tmp_path / "nothing-deployed")]) == 2
    assert main(["gate", "--candidate", str(out), "--first-deploy"]) == 0
    assert "promote" in capsys.readouterr().out.lower()
    assert main(["gate", "--candidate", str(out), "--current", str(out)]) == 1  # a tie keeps the current model
    sampled = tmp_path / "sampled"
    assert main(["evaluate", "--model", str(tiny_sft_dir), "--data", str(tiny_data_dir), "--sids", str(tiny_sids_dir),
                 "--out", str(sampled), "--users", "30", "--beam", "50", "--no-baselines"]) == 0
    capsys.readouterr()
    assert main(["gate", "--candidate", str(sampled), "--current", str(out)]) == 2  # other users: refused
    assert "evaluated with different users" in capsys.readouterr().err


def test_every_step_checks_the_split(tiny_data_dir: Path, tiny_sids_dir: Path, tiny_prompts_dir: Path,
                                     tiny_sft_dir: Path, tmp_path: Path) -> None:
    """Data written with another min_positives: the S-IDs, prompts and model made on the first split are refused."""
    other = tmp_path / "data-min4"
    write_data_dir(read_data_dir(tiny_data_dir), other, "data synth", {}, ["click", "conversion"], min_positives=4)
    assert read_manifest(other)["split"] == {"positive_actions": ["click", "conversion"], "min_positives": 4}
    assert read_manifest(tiny_sids_dir)["split"] == read_manifest(tiny_prompts_dir)["split"] == json.loads(
        (tiny_sft_dir / "leadre_model.json").read_text())["split"] == read_manifest(tiny_data_dir)["split"]
    with pytest.raises(SplitMismatch, match="S-IDs .* was made on the split .*'min_positives': 3.* not on .*4"):
        build_prompts(other, tiny_sids_dir, tmp_path / "prompts")
    with pytest.raises(SplitMismatch, match="S-IDs"):
        evaluate([tiny_sft_dir], other, tiny_sids_dir, tmp_path / "eval")
    with pytest.raises(SplitMismatch, match="model"):
        train_dpo(tiny_sft_dir, tiny_prompts_dir, other, tmp_path / "dpo")
    assert not any((tmp_path / name).exists() for name in ("prompts", "eval", "dpo"))


def test_bad_training_config_names_the_key(tiny_prompts_dir: Path, tiny_sids_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("sft:\n  epochz: 3\n")
    args = ["train", "sft", "--prompts", str(tiny_prompts_dir), "--sids", str(tiny_sids_dir), "--out", str(tmp_path / "m")]
    assert main(args + ["--config", str(config)]) == 2
    assert "unknown key sft.epochz" in capsys.readouterr().err
    config.write_text("model:\n  hidden_sise: 3\n")
    assert main(args + ["--config", str(config)]) == 2
    assert "hidden_sise" in capsys.readouterr().err
    assert main(args + ["--preset", str(tmp_path / "no-such-model")]) == 2
    assert not (tmp_path / "m").exists()
