"""Intent-aware prompts (DESIGN §1.1): one builder for training, evaluation and serving.

A next-ad prompt has the sections Task description, User profile, Interest summary, Content behaviour sequence
and Advertising behaviour sequence. The ad sequence is always the last section and the response (the next ad's
S-ID) continues it directly, so one example can teach every position: a *stream* example puts a window of a
user's ads in the response and the loss on each ad's S-ID (causal attention keeps every prediction from seeing
its own future). The interest summary and the content section therefore describe the user only up to the start
of the ad window; in a next-ad prompt the window is the most recent ads that fit the token budget.

Token budgets count pre-tokenizer pieces (`count_pieces`): an S-ID token is one piece, a word or a run of
punctuation is one. A byte-level BPE trained on this corpus keeps in-corpus words whole, so the model sees at
most about that many tokens.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections import Counter
from itertools import chain
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from leadre.artifacts import read_manifest, write_artifact
from leadre.schema import Tables, read_data_dir, split_settings_of
from leadre.sid import SidTable, load_sid_table
from leadre.split import SPLITS, Split

log = logging.getLogger(__name__)

TASKS = ("next_ad", "stream", "implicit", "explicit")
# GPT-2's pre-tokenizer pattern, with S-ID tokens kept whole (a tokenizer splits added tokens out first).
PIECE_RE = re.compile(r"<[a-z]_\d+>|'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d+| ?(?:(?!<[a-z]_\d+>)[^\s\w]|_)+|\s+(?!\S)|\s+")
STOPWORDS = frozenset("a an and are as at be by for from in is it of on or the to with your you this that".split())


def count_pieces(text: str) -> int:
    return len(PIECE_RE.findall(text))


@dataclass(frozen=True)
class Template:
    name: str
    task: str
    headers: dict[str, str]  # section -> header; "ads" is always last
    order: tuple[str, ...]  # order of the sections before "ads"


TEMPLATES: tuple[Template, ...] = (
    Template("structured", "Task description: predict the next ad this user will engage with, as its semantic ID.",
             {"profile": "User profile:", "interest": "Interest summary:", "content": "Content behaviour sequence:",
              "ads": "Advertising behaviour sequence:"}, ("profile", "interest", "content")),
    Template("assistant", "You are an ad recommender. Read about the user, then continue their ad sequence with the ad "
             "they will click next.", {"profile": "About the user:", "interest": "Long-term interests:",
                                       "content": "Recently viewed content:", "ads": "Ads engaged with, oldest first:"},
             ("interest", "content", "profile")),
    Template("terse", "Recommend the next ad for this user.", {"profile": "Profile -", "interest": "Interests -",
                                                              "content": "Content -", "ads": "Ad history -"},
             ("content", "profile", "interest")),
)
EXPLICIT_TASKS = (
    "Task description: give the semantic ID of the ad described below.",
    "Which semantic ID names this ad?",
    "Map the ad to its semantic ID.",
)


@dataclass(frozen=True)
class PromptConfig:
    """What `prompts build` makes. Validation and test always use plain next-ad prompts (template 0, no shuffle)."""

    templates: int = 3  # templates used for training examples (the first n of TEMPLATES)
    shuffle_profile: bool = True
    reuse: str = "stream"  # stream: windows with loss on every ad; per_target: one example per positive; last: no reuse
    max_prompt_tokens: int = 512
    stream_max_ads: int = 100  # ads per stream window (the response)
    # Windowings of each user's stream. Every pass after the first shifts the window boundaries by a random offset
    # and draws its own template and profile order, so a model trained for several epochs meets each ad in new
    # contexts instead of memorising one fixed set of windows.
    stream_passes: int = 1
    max_content_items: int = 8
    max_content_tokens: int = 96
    top_categories: int = 4
    top_advertisers: int = 3
    top_keywords: int = 6
    implicit_per_user: int = 1  # implicit-alignment examples per user (0 turns the task off)
    explicit_repeats: int = 1  # explicit-alignment examples per ad (0 turns the task off)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.reuse not in ("stream", "per_target", "last"):
            raise ValueError(f"prompt config reuse={self.reuse!r}: expected stream, per_target or last")
        if not 1 <= self.templates <= len(TEMPLATES):
            raise ValueError(f"prompt config templates={self.templates}: expected 1..{len(TEMPLATES)}")
        for name in ("max_prompt_tokens", "stream_max_ads", "stream_passes"):
            if getattr(self, name) < 1:
                raise ValueError(f"prompt config {name} must be positive")


def _keywords(text: str, exclude: str = "") -> tuple[str, ...]:
    skip = set(re.findall(r"[a-z]+", exclude.lower())) | STOPWORDS
    return tuple(w for w in re.findall(r"[a-z][a-z'-]{2,}", text.lower()) if w not in skip)


@dataclass
class PromptCatalogue:
    """Per-item text and token costs, computed once so that building a prompt is a few lookups."""

    levels: int
    sid: dict[str, str]
    ad_label: dict[str, str]  # "title [category]": an ad in the implicit task
    ad_label_cost: dict[str, int]
    ad_category: dict[str, str]
    ad_advertiser: dict[str, str]
    ad_keywords: dict[str, tuple[str, ...]]
    ad_description: dict[str, str]
    content_label: dict[str, str]
    content_label_cost: dict[str, int]
    content_category: dict[str, str]
    content_keywords: dict[str, tuple[str, ...]]

    @classmethod
    def build(cls, ads: pd.DataFrame, contents: pd.DataFrame, sids: SidTable) -> PromptCatalogue:
        if len(ads) == 0:
            raise ValueError("empty catalogue: no ads to build prompts for")
        missing = sorted(set(ads["ad_id"]) - set(sids.ad_ids))
        if missing:
            raise ValueError(f"{len(missing)} ads have no S-ID (e.g. {missing[:3]}); run `leadre sids assign` for new ads")
        ad_ids = ads["ad_id"].tolist()
        label = [f"{t} [{c}]" for t, c in zip(ads["title"], ads["category"])]
        description = [d if d.startswith(t) else f"{t}. {d}" for t, d in zip(ads["title"], ads["description"])]
        c_ids = contents["content_id"].tolist()
        c_label = [f"{t} [{c}]" for t, c in zip(contents["title"], contents["category"])]
        return cls(
            levels=sids.levels,
            sid={a: sids.sid_of(a) for a in ad_ids},
            ad_label=dict(zip(ad_ids, label)),
            ad_label_cost={a: count_pieces(" | " + x) for a, x in zip(ad_ids, label)},
            ad_category=dict(zip(ad_ids, ads["category"])),
            ad_advertiser=dict(zip(ad_ids, ads["advertiser"])),
            ad_keywords={a: _keywords(t, adv) for a, t, adv in zip(ad_ids, ads["title"], ads["advertiser"])},
            ad_description=dict(zip(ad_ids, description)),
            content_label=dict(zip(c_ids, c_label)),
            content_label_cost={c: count_pieces(" | " + x) for c, x in zip(c_ids, c_label)},
            content_category=dict(zip(c_ids, contents["category"])),
            content_keywords={c: _keywords(t) for c, t in zip(c_ids, contents["title"])},
        )

    def check(self, history: UserHistory) -> None:
        """Raise a KeyError naming the first ad or content of `history` that the catalogue does not know."""
        for kind, ids, known in (("ad", history.ads, self.sid), ("content", history.contents, self.content_label)):
            for item in ids:
                if item not in known:
                    raise KeyError(f"user {history.user_id!r}: unknown {kind} {item!r}: not in the catalogue")


@dataclass
class UserHistory:
    """What a prompt is built from: a user's features alone (serving reads them from the feature store)."""

    user_id: str
    profile: dict[str, str]
    ads: list[str] = field(default_factory=list)  # positive ad interactions, oldest first
    contents: list[str] = field(default_factory=list)  # content interactions, oldest first


def render_profile(profile: dict[str, str], order: Sequence[str] | None = None) -> str:
    keys = order if order is not None else list(profile)
    parts = [f"{k.replace('_', ' ')} {profile[k]}" for k in keys if str(profile[k]) not in ("", "nan", "None")]
    return "; ".join(parts) + "." if parts else "unknown."


def _weights(counter: Counter, top: int) -> list[tuple[str, int]]:
    total = sum(counter.values())
    shares = [(k, round(100 * v / total)) for k, v in counter.most_common(top)] if total else []
    return [(k, w) for k, w in shares if w > 0]


def interest_summary(ads: Sequence[str], contents: Sequence[str], cat: PromptCatalogue, cfg: PromptConfig) -> str:
    """Long-term interest as text: top categories, advertisers and keywords with their shares."""
    if not ads and not contents:
        return "none yet."
    # One C-level count per field: this runs for every prompt the near-line service builds.
    categories = Counter(chain(map(cat.ad_category.__getitem__, ads), map(cat.content_category.__getitem__, contents)))
    advertisers = Counter(map(cat.ad_advertiser.__getitem__, ads))
    keywords = Counter(chain.from_iterable(chain(map(cat.ad_keywords.__getitem__, ads),
                                                 map(cat.content_keywords.__getitem__, contents))))
    parts = ["categories " + ", ".join(f"{k} {w}%" for k, w in _weights(categories, cfg.top_categories))]
    if advertisers:
        parts.append("advertisers " + ", ".join(f"{k} {w}%" for k, w in _weights(advertisers, cfg.top_advertisers)))
    if keywords:
        parts.append("keywords " + ", ".join(k for k, _ in keywords.most_common(cfg.top_keywords)))
    return "; ".join(parts) + "."


def _suffix(items: Sequence[str], cost: dict[str, int] | int, budget: int, limit: int) -> int:
    """How many of the most recent items fit the budget (cut from the oldest end)."""
    if isinstance(cost, int):
        return max(0, min(len(items), limit, budget // cost))
    n, used = 0, 0
    for item in reversed(items[len(items) - limit:] if limit < len(items) else items):
        used += cost[item]
        if used > budget:
            break
        n += 1
    return n


def _window_cost(items: Sequence[str], cost: dict[str, int] | int) -> int:
    return len(items) * cost if isinstance(cost, int) else sum(cost[i] for i in items)


def _content_section(contents: Sequence[str], cat: PromptCatalogue, cfg: PromptConfig, limit: int) -> tuple[str, int]:
    """The most recent contents (at most `limit`) within their budget, and how many were shown."""
    n = _suffix(contents, cat.content_label_cost, cfg.max_content_tokens, limit)
    shown = contents[len(contents) - n:] if n else []
    return (" | ".join(cat.content_label[c] for c in shown) if shown else "none."), n


def _compose(template: Template, profile: str, interest: str, content: str) -> str:
    body = {"profile": profile, "interest": interest, "content": content}
    lines = [template.task] + [f"{template.headers[s]} {body[s]}" for s in template.order]
    return "\n".join(lines) + f"\n{template.headers['ads']} "


def _header(history: UserHistory, n_window: int, content_limit: int, cat: PromptCatalogue, cfg: PromptConfig,
            template: Template, profile_order: Sequence[str] | None) -> tuple[str, int, int]:
    """Everything before the ad window: task, profile, interest summary (of the history older than the ad and
    content windows) and content behaviour; with its piece count and the number of contents shown."""
    content_text, n_shown = _content_section(history.contents, cat, cfg, content_limit)
    older_ads = history.ads[: len(history.ads) - n_window]
    older_contents = history.contents[: len(history.contents) - n_shown]
    summary = interest_summary(older_ads, older_contents, cat, cfg)
    text = _compose(template, render_profile(history.profile, profile_order), summary, content_text)
    return text, count_pieces(text), n_shown


def _fit(history: UserHistory, cat: PromptCatalogue, cfg: PromptConfig, template: Template,
         profile_order: Sequence[str] | None, cost: dict[str, int] | int, max_ads: int) -> tuple[str, list[str]]:
    """The header and the ad window (at most `max_ads` ads) within the prompt budget: the oldest ads go first,
    then the oldest contents."""
    ads, limit = history.ads, cfg.max_content_items
    # The window depends on the header's size and the header (its summary of the ads older than the window) on the
    # window. Start from the header of a window of every ad (the shortest summary), then move the oldest ads of the
    # window into the summary until the whole prompt fits; each round removes at least the overflow.
    _, fixed, _ = _header(history, len(ads), limit, cat, cfg, template, profile_order)
    n = _suffix(ads, cost, max(0, cfg.max_prompt_tokens - fixed), min(len(ads), max_ads))
    while True:
        head, used, shown = _header(history, n, limit, cat, cfg, template, profile_order)
        window = ads[len(ads) - n:] if n else []
        over = used + _window_cost(window, cost) - cfg.max_prompt_tokens
        if over <= 0:
            return head, window
        if n:
            n -= _covering(window, cost, over)
        elif shown:
            limit = shown - 1
        else:
            raise ValueError(f"max_prompt_tokens={cfg.max_prompt_tokens} is too small: the task, profile and interest "
                             f"summary of user {history.user_id!r} alone take {used} pieces")


def _covering(window: Sequence[str], cost: dict[str, int] | int, over: int) -> int:
    """How many of the oldest items of `window` cost at least `over` pieces together."""
    if isinstance(cost, int):
        return min(len(window), -(-over // cost))
    dropped = 0
    for n, item in enumerate(window, 1):
        dropped += cost[item]
        if dropped >= over:
            return n
    return len(window)


def build_prompt(history: UserHistory, cat: PromptCatalogue, cfg: PromptConfig, template: Template = TEMPLATES[0],
                 profile_order: Sequence[str] | None = None, implicit: bool = False) -> str:
    """The next-ad prompt; the response is the next ad's S-ID. `implicit` writes the ads as text, not S-IDs."""
    cat.check(history)
    cost = cat.ad_label_cost if implicit else cat.levels
    head, window = _fit(history, cat, cfg, template, profile_order, cost, len(history.ads))
    if implicit:
        return head + "".join(cat.ad_label[a] + " | " for a in window)
    return head + "".join(cat.sid[a] for a in window)


def explicit_example(ad_id: str, cat: PromptCatalogue, variant: int = 0) -> dict[str, str]:
    prompt = (f"{EXPLICIT_TASKS[variant % len(EXPLICIT_TASKS)]}\nAd: {cat.ad_description[ad_id]} "
              f"Category: {cat.ad_category[ad_id]}. Advertiser: {cat.ad_advertiser[ad_id]}.\nSemantic ID: ")
    return {"task": "explicit", "template": f"explicit{variant % len(EXPLICIT_TASKS)}", "ad_id": ad_id,
            "prompt": prompt, "completion": cat.sid[ad_id]}


@dataclass
class UserTimeline:
    """One user's positives and contents with their positions in the user's event timeline."""

    user_id: str
    profile: dict[str, str]
    ads: list[str]
    ad_pos: np.ndarray
    contents: list[str]
    content_pos: np.ndarray
    target_pos: dict[str, int]  # split ('validation', 'test') -> the target's timeline position; empty: not evaluated

    def target_index(self, which: str) -> int:
        """The index in `ads` of the user's `which` target (the split's, never re-derived)."""
        return int(np.searchsorted(self.ad_pos, self.target_pos[which]))

    @property
    def n_train(self) -> int:
        """Positives in the training window: those before the validation target (all of a user not evaluated)."""
        return self.target_index("validation") if self.target_pos else len(self.ads)

    def history(self, before: int) -> UserHistory:
        """The user's features as they were just before timeline position `before`."""
        n_ads = int(np.searchsorted(self.ad_pos, before))
        n_contents = int(np.searchsorted(self.content_pos, before))
        return UserHistory(self.user_id, self.profile, self.ads[:n_ads], self.contents[:n_contents])


def user_timelines(tables: Tables, split: Split) -> Iterator[UserTimeline]:
    ev = split.events
    positives = ev[ev["positive"]]
    contents = ev[ev["item_type"] == "content"]
    pos_groups = positives.groupby("user_id", sort=False)
    content_groups = {u: g for u, g in contents.groupby("user_id", sort=False)}
    profile_cols = [c for c in tables.users.columns if c != "user_id"]
    profiles = tables.users.set_index("user_id")[profile_cols].astype(str).to_dict("index")
    evaluated = split.users[split.users["test_pos"] >= 0]
    targets = {u: {"validation": int(v), "test": int(t)}
               for u, v, t in zip(evaluated["user_id"], evaluated["validation_pos"], evaluated["test_pos"])}
    empty = pd.DataFrame({"item_id": pd.Series(dtype=str), "pos": pd.Series(dtype="int32")})
    for user_id, g in pos_groups:
        c = content_groups.get(user_id, empty)
        yield UserTimeline(user_id, profiles[user_id], g["item_id"].tolist(), g["pos"].to_numpy(),
                           c["item_id"].tolist(), c["pos"].to_numpy(), targets.get(user_id, {}))


def _profile_order(profile: dict[str, str], rng: np.random.Generator, cfg: PromptConfig) -> list[str]:
    keys = list(profile)
    return [keys[i] for i in rng.permutation(len(keys))] if cfg.shuffle_profile else keys


def _stream_windows(n_train: int, cfg: PromptConfig, rng: np.random.Generator) -> Iterator[tuple[int, int]]:
    """(start, end) of the stream windows over a user's first `n_train` positives, pass after pass; the first pass
    starts at the oldest positive, each later one at a random offset (its first window is the short one)."""
    for p in range(cfg.stream_passes):
        offset = int(rng.integers(1, cfg.stream_max_ads)) if p and cfg.stream_max_ads > 1 else 0
        bounds = [0, *range(offset or cfg.stream_max_ads, n_train, cfg.stream_max_ads), n_train]
        yield from zip(bounds[:-1], bounds[1:])


def _training_examples(t: UserTimeline, cat: PromptCatalogue, cfg: PromptConfig,
                       rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    """Training examples of one user from the positives of their training window."""
    n_train = t.n_train
    if n_train == 0:
        return
    train_pos = t.ad_pos[:n_train]

    def pick() -> tuple[Template, list[str]]:
        return TEMPLATES[rng.integers(cfg.templates)], _profile_order(t.profile, rng, cfg)

    if cfg.reuse == "stream":
        for start, end in _stream_windows(n_train, cfg, rng):
            template, order = pick()
            head, _ = _fit(t.history(int(train_pos[start])), cat, cfg, template, order, cat.levels, max_ads=0)
            yield {"task": "stream", "template": template.name, "user_id": t.user_id, "targets": t.ads[start:end],
                   "prompt": head, "completion": "".join(cat.sid[a] for a in t.ads[start:end])}
    else:
        targets = range(n_train) if cfg.reuse == "per_target" else [n_train - 1]
        for i in targets:
            template, order = pick()
            prompt = build_prompt(t.history(int(train_pos[i])), cat, cfg, template, order)
            yield {"task": "next_ad", "template": template.name, "user_id": t.user_id, "target": t.ads[i],
                   "prompt": prompt, "completion": cat.sid[t.ads[i]]}
    for i in rng.choice(n_train, size=min(cfg.implicit_per_user, n_train), replace=False):
        template, order = pick()
        prompt = build_prompt(t.history(int(train_pos[i])), cat, cfg, template, order, implicit=True)
        yield {"task": "implicit", "template": template.name, "user_id": t.user_id, "target": t.ads[i],
               "prompt": prompt, "completion": cat.sid[t.ads[i]]}


def _eval_example(t: UserTimeline, which: str, cat: PromptCatalogue, cfg: PromptConfig) -> dict[str, Any]:
    target = t.ads[t.target_index(which)]
    history = t.history(t.target_pos[which])
    return {"task": "next_ad", "template": TEMPLATES[0].name, "user_id": t.user_id, "target": target,
            "seen": history.ads, "prompt": build_prompt(history, cat, cfg), "completion": cat.sid[target]}


def eval_examples(tables: Tables, split: Split, which: str, cat: PromptCatalogue, cfg: PromptConfig) -> dict[str, dict[str, Any]]:
    """Per evaluated user, the plain next-ad example of their `which` ('validation' or 'test') target."""
    if which not in SPLITS:
        raise ValueError(f"split {which!r}: expected one of {SPLITS}")
    return {t.user_id: _eval_example(t, which, cat, cfg) for t in user_timelines(tables, split) if t.target_pos}


def build_prompt_sets(tables: Tables, split: Split, sids: SidTable, cfg: PromptConfig) -> dict[str, list[dict[str, Any]]]:
    """train / validation / test examples. Validation and test: one plain next-ad example per evaluated user."""
    cat = PromptCatalogue.build(tables.ads, tables.contents, sids)
    rng = np.random.default_rng(cfg.seed)
    sets: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "test": []}
    for t in tqdm(user_timelines(tables, split), total=split.events.loc[split.events["positive"], "user_id"].nunique(),
                  desc="prompts", unit="user", disable=None):
        if t.target_pos:
            sets["validation"].append(_eval_example(t, "validation", cat, cfg))
            sets["test"].append(_eval_example(t, "test", cat, cfg))
        sets["train"].extend(_training_examples(t, cat, cfg, rng))
    for ad_id in tables.ads["ad_id"]:
        sets["train"].extend(explicit_example(ad_id, cat, v) for v in range(cfg.explicit_repeats))
    order = rng.permutation(len(sets["train"]))
    sets["train"] = [sets["train"][i] for i in order]
    return sets


def _length_stats(examples: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    stats = {}
    for task in TASKS:
        lengths = np.array([count_pieces(e["prompt"]) + count_pieces(e["completion"]) for e in examples if e["task"] == task])
        if len(lengths):
            q = np.percentile(lengths, [50, 90, 99, 100])
            stats[task] = {"n": int(len(lengths)), "mean": round(float(lengths.mean()), 1),
                           **dict(zip(("median", "p90", "p99", "max"), map(float, q)))}
    return stats


def _plot_lengths(examples: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for task in TASKS:
        lengths = [count_pieces(e["prompt"]) + count_pieces(e["completion"]) for e in examples if e["task"] == task]
        if lengths:
            ax.hist(lengths, bins=40, alpha=0.6, label=f"{task} ({len(lengths):,})")
    ax.set(xlabel="prompt + response length (pieces)", ylabel="examples", title="Training example lengths")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_prompts(data_dir: str | Path, sids_dir: str | Path, out: str | Path, cfg: PromptConfig = PromptConfig()) -> dict[str, Any]:
    """`leadre prompts build`: write train/validation/test JSONL with counts and length statistics."""
    tables = read_data_dir(data_dir)
    sids = load_sid_table(sids_dir)
    settings = split_settings_of(data_dir)
    settings.check(read_manifest(sids_dir).get("split"), f"S-IDs {sids_dir}")
    sets = build_prompt_sets(tables, settings.split(tables.events), sids, cfg)
    with write_artifact(out, "prompts build", {"data": data_dir, "sids": sids_dir}, dataclasses.asdict(cfg)) as (tmp, manifest):
        for name, examples in sets.items():
            with open(tmp / f"{name}.jsonl", "w") as f:
                for e in examples:
                    f.write(json.dumps(e, ensure_ascii=False) + "\n")
        train = sets["train"]
        stats = {
            "per_task": dict(Counter(e["task"] for e in train)),
            "per_template": dict(Counter(e["template"] for e in train)),
            "stream_targets": sum(len(e.get("targets", ())) for e in train),
            "lengths": _length_stats(train + sets["validation"]),
        }
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        _plot_lengths(train, tmp / "lengths.png")
        manifest["counts"] = {name: len(examples) for name, examples in sets.items()}
        manifest["level_sizes"] = list(sids.level_sizes)
        manifest["split"] = settings.as_dict()
        manifest["stats"] = stats
    return manifest


def read_prompts(prompts_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """The examples of one split ('train', 'validation' or 'test') of a prompts artifact."""
    if split not in ("train", *SPLITS):
        raise ValueError(f"split {split!r}: expected train, validation or test")
    read_manifest(prompts_dir, "prompts build")
    with open(Path(prompts_dir) / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f]
