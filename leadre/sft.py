"""`leadre train sft`: supervised fine-tuning on next-ad generation plus the alignment tasks.

The recipe, top to bottom: read the prompts, build the tokenizer and model (`leadre.model`), tokenize every example
as prompt + response with the loss on the response only (for a stream example: every ad's S-ID in it), train with
trl's SFTTrainer, measure validation Recall@10 through the trie-constrained decoder at every evaluation and keep
the best checkpoint, then write a self-contained model directory.

Checkpoints go to a work directory beside the output (`<out>.work`); a run that crashed resumes from its last
checkpoint when started again with the same arguments. The work directory is removed once the model is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from leadre.artifacts import read_manifest, write_artifact
from leadre.config import ConfigError
from leadre.devices import describe, resolve_device, train_bf16
from leadre.metrics import KS, ndcg_at, recall_at
from leadre.model import PRESETS, build_model, create_model, resolve_config, save_model
from leadre.prompts import TASKS, read_prompts
from leadre.recall import LLMRecaller
from leadre.sid import SidTable, load_sid_table
from leadre.split import SplitSettings

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The `sft` section of a config file."""

    epochs: float = 5.0
    batch_size: int = 16
    learning_rate: float = 2e-3  # from scratch; LoRA on a pretrained base wants ~2e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    lr_scheduler: str = "cosine"
    max_length: int = 1024
    # Sampling ratio per task: 1 uses every example once per epoch, 0.5 a random half, 2 each twice.
    mix: dict = dataclasses.field(default_factory=lambda: {"stream": 1.0, "next_ad": 1.0, "implicit": 1.0, "explicit": 1.0})
    group_by_length: bool = True  # batches of similar length waste little compute on padding
    evals_per_epoch: float = 1.0
    eval_users: int = 300  # validation users scored by constrained decoding at each evaluation
    beam: int = 20
    max_minutes: float | None = None  # wall-clock budget for training; stops early (after a last evaluation)
    threads: int = 2
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda (leadre.devices)
    precision: str = "auto"  # auto (bf16 autocast where the device computes bf16 natively) | bf16 | fp32

    def __post_init__(self) -> None:
        unknown = set(self.mix) - set(TASKS)
        if unknown:
            raise ValueError(f"mix: unknown tasks {sorted(unknown)} (tasks: {', '.join(TASKS)})")
        if any(not isinstance(v, (int, float)) or v < 0 for v in self.mix.values()):
            raise ValueError("mix: ratios must be numbers >= 0")
        if self.epochs <= 0 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError("epochs, batch_size and learning_rate must be positive")


def mix_examples(examples: Sequence[dict[str, Any]], mix: dict[str, float], seed: int) -> list[dict[str, Any]]:
    """Each task's examples repeated floor(r) times plus a random (r - floor(r)) share of them, shuffled."""
    rng = np.random.default_rng(seed)
    by_task: dict[str, list[dict[str, Any]]] = {}
    for e in examples:
        by_task.setdefault(e["task"], []).append(e)
    mixed: list[dict[str, Any]] = []
    for task, items in by_task.items():
        ratio = float(mix.get(task, 1.0))
        mixed += items * int(ratio)
        extra = int(round((ratio - int(ratio)) * len(items)))
        mixed += [items[i] for i in rng.choice(len(items), size=extra, replace=False)]
    return [mixed[i] for i in rng.permutation(len(mixed))]


def tokenize_examples(examples: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """`input_ids` = prompt + response tokens, `completion_mask` = 1 on the response (where the loss goes)."""
    prompts = tokenizer([e["prompt"] for e in examples], add_special_tokens=False)["input_ids"]
    responses = tokenizer([e["completion"] for e in examples], add_special_tokens=False)["input_ids"]
    return Dataset.from_dict({
        "input_ids": [p + r for p, r in zip(prompts, responses)],
        "completion_mask": [[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)],
        "task": [e["task"] for e in examples],
    })


def validation_recall(recaller: LLMRecaller, examples: Sequence[dict[str, Any]], beam: int) -> dict[str, float]:
    """Recall@K and NDCG@K of constrained decoding on validation next-ad examples, with each user's seen ads
    excluded inside the search (the evaluation's headline protocol); K up to the beam width, and at least 10 (the
    checkpoint-selection metric)."""
    top_n = max(beam, 10)
    ranked = recaller.recall([e["prompt"] for e in examples], top_n=top_n, beam_width=top_n,
                             exclude=[set(e["seen"]) for e in examples])
    ranks = np.array([next((i for i, (ad, _) in enumerate(r) if ad == e["target"]), -1) for r, e in zip(ranked, examples)])
    ks = [k for k in KS if k <= top_n]
    return {f"recall@{k}": recall_at(ranks, k) for k in ks} | {f"ndcg@{k}": ndcg_at(ranks, k) for k in ks}


class RecallSFTTrainer(SFTTrainer):
    """SFTTrainer whose evaluation also decodes: `eval_recall@10` picks the best checkpoint."""

    def __init__(self, *args: Any, sids: SidTable, recall_examples: Sequence[dict[str, Any]], beam: int,
                 response_tokens_per_batch: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.sids, self.recall_examples, self.beam = sids, recall_examples, beam
        self.response_tokens_per_batch = response_tokens_per_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001 (Trainer's)
        # Every training batch divides its summed token loss by the same number, so a task weighs in by its response
        # tokens. With the per-batch mean instead, a batch of short explicit-alignment examples (length grouping makes
        # them) would get as large an optimiser step as a batch of long streams: on MovieLens-1M a third of all steps.
        if model.training:
            num_items_in_batch = self.response_tokens_per_batch
        # The model's own cross-entropy, not TRL's fused log-prob head: the loss is the same, but the head's chunked
        # fp32 backward and its per-step entropy and token-accuracy metrics cost 9% more time per MovieLens-1M step
        # over a 3-minute run (bench/README.md).
        inputs["use_cache"] = False
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        metrics = super().evaluate(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        recaller = LLMRecaller.from_model(model, self.processing_class, self.sids)
        extra = {f"eval_{k}": v for k, v in validation_recall(recaller, self.recall_examples, self.beam).items()}
        model.train(was_training)
        self.log(extra)
        metrics.update(extra)
        return metrics


class _Clock(TrainerCallback):
    """Times the training steps (for a tokens/s figure without evaluation) and stops at a wall-clock budget,
    evaluating and saving once more so that the best checkpoint sees the final weights."""

    def __init__(self, max_minutes: float | None) -> None:
        self.max_seconds = None if max_minutes is None else 60.0 * max_minutes
        self.step_seconds, self.step_started, self.train_started = 0.0, 0.0, 0.0
        self.steps = 0  # steps of this run (a resumed run starts after the checkpoint's)
        self.stopped_early = False

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 (transformers' callback signature)
        self.train_started = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self.step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        now = time.perf_counter()
        self.step_seconds += now - self.step_started
        self.steps += 1
        if self.max_seconds is not None and now - self.train_started > self.max_seconds and not control.should_training_stop:
            log.info("sft: time budget of %.1f minutes reached at step %d", self.max_seconds / 60, state.global_step)
            control.should_training_stop = control.should_evaluate = control.should_save = True
            self.stopped_early = True


def plot_curves(log_history: list[dict[str, Any]], path: Path) -> None:
    """Training and validation loss, and validation Recall@10, against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    recall = [(h["step"], h["eval_recall@10"]) for h in log_history if "eval_recall@10" in h and "eval_loss" not in h]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for points, label in ((train, "train"), (evals, "validation")):
        if points:
            ax1.plot(*zip(*points), marker="." if label == "validation" else None, label=label)
    ax1.set(xlabel="step", ylabel="loss (response tokens)", title="SFT loss")
    ax1.legend()
    if recall:
        ax2.plot(*zip(*recall), marker="o")
    ax2.set(xlabel="step", ylabel="Recall@10", title="Validation Recall@10 (constrained decoding)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _work_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.work"


def train_sft(prompts_dir: str | Path, sids_dir: str | Path, out: str | Path, preset: str = "tiny",
              settings: TrainSettings = TrainSettings(), model_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train, keep the best checkpoint by validation Recall@10, write the model directory; returns its metadata."""
    out = Path(out)
    prompts_manifest = read_manifest(prompts_dir, "prompts build")
    sids = load_sid_table(sids_dir)
    if list(sids.level_sizes) != list(prompts_manifest["level_sizes"]):
        raise ValueError(f"{prompts_dir} was built with S-ID levels {prompts_manifest['level_sizes']}, "
                         f"but {sids_dir} has {list(sids.level_sizes)}")
    split = SplitSettings.from_dict(prompts_manifest.get("split"), f"prompts {prompts_dir}")
    split.check(read_manifest(sids_dir).get("split"), f"S-IDs {sids_dir}")
    if preset not in PRESETS and not Path(preset).is_dir():
        raise ConfigError(f"unknown preset {preset!r}: expected {', '.join(PRESETS)} or a local model directory")
    device = resolve_device(settings.device)
    if device.index is not None:
        torch.cuda.set_device(device)  # the Trainer places the model on the current CUDA device
    bf16 = train_bf16(device, settings.precision)
    log.info("sft: training on %s%s", describe(device), " with bf16 autocast" if bf16 else " in float32")
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    train = read_prompts(prompts_dir, "train")
    validation = read_prompts(prompts_dir, "validation")
    rng = np.random.default_rng(settings.seed)
    recall_examples = [validation[i] for i in sorted(rng.choice(len(validation), min(settings.eval_users, len(validation)), replace=False))]

    work = _work_dir(out)
    work.mkdir(parents=True, exist_ok=True)
    if preset in PRESETS and (work / "tokenizer").is_dir():  # resuming: keep the tokenizer the checkpoints know
        tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer", local_files_only=True)
        model = build_model(resolve_config(preset, model_overrides), tokenizer)
    else:
        model, tokenizer = create_model(preset, sids.level_sizes, (e["prompt"] + e["completion"] for e in train),
                                        model_overrides)
        tokenizer.save_pretrained(work / "tokenizer")
    mixed = mix_examples(train, settings.mix, settings.seed)
    train_ds = tokenize_examples(mixed, tokenizer)
    eval_ds = tokenize_examples(recall_examples, tokenizer)
    n_tokens = sum(len(x) for x in train_ds["input_ids"])
    n_response_tokens = sum(sum(m) for m in train_ds["completion_mask"])
    steps_per_epoch = math.ceil(len(train_ds) / settings.batch_size)
    eval_steps = max(1, int(steps_per_epoch / settings.evals_per_epoch))
    log.info("sft: %d training examples (%s), %d tokens per epoch, %d steps per epoch, evaluation every %d steps",
             len(train_ds), dict(Counter(train_ds["task"])), n_tokens, steps_per_epoch, eval_steps)

    args = SFTConfig(
        output_dir=str(work / "checkpoints"),
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        warmup_steps=int(settings.warmup_ratio * steps_per_epoch * settings.epochs),
        lr_scheduler_type=settings.lr_scheduler,
        max_length=settings.max_length,
        completion_only_loss=True,
        train_sampling_strategy="group_by_length" if settings.group_by_length else "random",
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_recall@10",
        greater_is_better=True,
        logging_steps=max(1, min(50, eval_steps // 4)),
        report_to="none",
        # bf16 autocast where the device computes it natively; activation recomputation only costs time (the models
        # are small).
        bf16=bf16,
        gradient_checkpointing=False,
        use_cpu=device.type == "cpu",
        seed=settings.seed,
        data_seed=settings.seed,
        dataloader_num_workers=0,
    )
    clock = _Clock(settings.max_minutes)
    trainer = RecallSFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                               processing_class=tokenizer, callbacks=[clock], sids=sids,
                               recall_examples=recall_examples, beam=settings.beam,
                               response_tokens_per_batch=n_response_tokens / steps_per_epoch)
    checkpoint = get_last_checkpoint(str(work / "checkpoints")) if (work / "checkpoints").is_dir() else None
    if checkpoint:
        log.info("sft: resuming from %s", checkpoint)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    wall = time.perf_counter() - started
    best = trainer.state.best_metric
    final = trainer.evaluate()
    history = trainer.state.log_history
    trained_tokens = n_tokens * clock.steps / steps_per_epoch

    parameters = {"preset": preset, "settings": dataclasses.asdict(settings), "model_overrides": model_overrides or {}}
    with write_artifact(out, "train sft", {"prompts": prompts_dir, "sids": sids_dir}, parameters) as (tmp, manifest):
        metadata = save_model(trainer.model, tokenizer, tmp, {
            "base": preset,
            "stage": "sft",
            "level_sizes": list(sids.level_sizes),
            "prompts": str(prompts_dir),
            "sids": str(sids_dir),
            "data_version": prompts_manifest["inputs"].get("data"),
            "prompts_created_at": prompts_manifest["created_at"],
            "prompt_config": prompts_manifest["parameters"],
            "split": split.as_dict(),
            "metrics": {k.removeprefix("eval_"): v for k, v in final.items() if k.startswith("eval_")},
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "best_validation_recall@10": best,
            "training": {"steps": trainer.state.global_step, "epochs": settings.epochs, "wall_seconds": round(wall, 1),
                         "precision": "bf16" if bf16 else "fp32",
                         "tokens_per_second": round(trained_tokens / max(clock.step_seconds, 1e-9), 1),
                         "stopped_at_time_budget": clock.stopped_early,
                         "examples_per_epoch": len(train_ds), "tokens_per_epoch": n_tokens,
                         "resumed_from": checkpoint},
        })
        (tmp / "log_history.json").write_text(json.dumps(history, indent=1) + "\n")
        plot_curves(history, tmp / "loss_curves.png")
        manifest["split"] = split.as_dict()
        manifest["counts"] = {"train_examples": len(train_ds), "steps": trainer.state.global_step,
                              "parameters": metadata["model"]["parameters"]}
        manifest["metrics"] = metadata["metrics"]
    shutil.rmtree(work, ignore_errors=True)
    return metadata
