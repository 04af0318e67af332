"""The standard evaluation split, used by every later step: per-user leave-one-out in time order.

Per user, the positive ad interactions in time order are the targets: the last one is the test target, the
second-to-last the validation target, the rest are training targets. Time order is a stable sort, so events
with equal timestamps keep the order of the input file. A positive that repeats the user's previous positive ad
(a conversion right after its click) is not a new interaction and is not a target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

SPLITS = ("validation", "test")
DEFAULT_MIN_POSITIVES = 3


class SplitMismatch(ValueError):
    """Two artifacts were made on different splits (or one records none): their numbers cannot be combined."""


@dataclass(frozen=True)
class SplitSettings:
    """What defines the split. Chosen once, by the data step (`leadre data ... --min-positives`), recorded in the data
    manifest under "split" and copied into the manifest of every artifact made from it (S-IDs, prompts, models,
    evaluations); a step that reads several artifacts checks that they all record the same split."""

    positive_actions: tuple[str, ...]
    min_positives: int = DEFAULT_MIN_POSITIVES

    def __post_init__(self) -> None:
        if isinstance(self.positive_actions, str) or not self.positive_actions:
            raise ValueError(f"positive_actions must be a non-empty list of actions, got {self.positive_actions!r}")
        if isinstance(self.min_positives, bool) or not isinstance(self.min_positives, int) or self.min_positives < 2:
            raise ValueError(f"min_positives must be an integer of at least 2 (one validation and one test target), "
                             f"got {self.min_positives!r}")
        object.__setattr__(self, "positive_actions", tuple(sorted(set(map(str, self.positive_actions)))))

    def as_dict(self) -> dict[str, Any]:
        return {"positive_actions": list(self.positive_actions), "min_positives": self.min_positives}

    @classmethod
    def from_dict(cls, recorded: Any, source: str) -> SplitSettings:
        """The settings a manifest recorded under "split"; `source` names the artifact in errors."""
        if not isinstance(recorded, dict) or set(recorded) != {"positive_actions", "min_positives"}:
            raise SplitMismatch(f"{source}: records no split settings (got {recorded!r}); it was made by an older "
                                "leadre: rebuild it (and the data directory it came from)")
        try:
            return cls(tuple(recorded["positive_actions"]), recorded["min_positives"])
        except (TypeError, ValueError) as e:
            raise SplitMismatch(f"{source}: bad split settings {recorded!r}: {e}") from None

    def check(self, recorded: Any, source: str) -> None:
        """Raise `SplitMismatch` unless `recorded` (a manifest's "split") names these settings."""
        other = SplitSettings.from_dict(recorded, source)
        if other != self:
            raise SplitMismatch(f"{source} was made on the split {other.as_dict()}, not on {self.as_dict()}: "
                                "rebuild it from the same data directory as the other inputs")

    def split(self, events: pd.DataFrame) -> Split:
        return leave_one_out(events, self.positive_actions, self.min_positives)


def order_events(events: pd.DataFrame) -> pd.DataFrame:
    """Events grouped by user, each user's in time order (stable), with `pos`: the index in the user's timeline."""
    ordered = events.sort_values("ts", kind="stable").sort_values("user_id", kind="stable").reset_index(drop=True)
    ordered["pos"] = ordered.groupby("user_id", sort=False).cumcount().astype("int32")
    return ordered


@dataclass
class Split:
    events: pd.DataFrame  # order_events(...) plus `positive`
    users: pd.DataFrame  # user_id, n_positives, validation_pos, test_pos (-1 when the user is not evaluated)

    def targets(self, split: str) -> pd.DataFrame:
        """One row per evaluated user: user_id, ad_id, pos (the target's index in the timeline), ts."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: expected one of {SPLITS}")
        users = self.users[self.users[f"{split}_pos"] >= 0]
        key = pd.MultiIndex.from_arrays([users["user_id"], users[f"{split}_pos"]])
        ev = self.events.set_index(["user_id", "pos"])
        rows = ev.loc[key, ["item_id", "ts"]].reset_index()
        return rows.rename(columns={"item_id": "ad_id"})[["user_id", "ad_id", "pos", "ts"]]

    def before(self, cut: str) -> pd.DataFrame:
        """Events strictly before each user's `cut` target ('validation' or 'test'); all events of users not
        evaluated when the cut is 'validation' (their whole timeline is training data)."""
        if cut not in SPLITS:
            raise ValueError(f"cut {cut!r}: expected one of {SPLITS}")
        limit = self.users.set_index("user_id")[f"{cut}_pos"]
        limit = limit.where(limit >= 0, np.iinfo(np.int32).max if cut == "validation" else -1)
        lim = limit.reindex(self.events["user_id"]).to_numpy()
        return self.events[self.events["pos"].to_numpy() < lim]

    def train_events(self) -> pd.DataFrame:
        """The training window: everything before the validation target."""
        return self.before("validation")

    def train_targets(self) -> pd.DataFrame:
        """Positive ad events in the training window (positive-interaction reuse draws its targets here)."""
        ev = self.train_events()
        return ev[ev["positive"]]


def mark_positives(events: pd.DataFrame, positive_actions: list[str] | tuple[str, ...]) -> pd.Series:
    """Positive ad interactions of ordered events, without repeats of the user's previous positive ad."""
    candidate = (events["item_type"] == "ad") & events["action"].isin(list(positive_actions))
    pos = events[candidate]
    repeat = pos.groupby("user_id", sort=False)["item_id"].shift().to_numpy() == pos["item_id"].to_numpy()
    positive = candidate.copy()
    positive.loc[pos.index[repeat]] = False
    return positive


def leave_one_out(events: pd.DataFrame, positive_actions: Sequence[str], min_positives: int = DEFAULT_MIN_POSITIVES) -> Split:
    """Split users' timelines; users with fewer than `min_positives` positives are training-only."""
    if min_positives < 2:
        raise ValueError("min_positives must be at least 2 (one validation and one test target)")
    ordered = order_events(events)
    ordered["positive"] = mark_positives(ordered, positive_actions)
    pos = ordered.loc[ordered["positive"], ["user_id", "pos"]]
    by_user = pos.groupby("user_id", sort=False)["pos"]
    users = pd.DataFrame({
        "n_positives": by_user.size(),
        "test_pos": by_user.last(),
        "validation_pos": pos.groupby("user_id", sort=False).tail(2).groupby("user_id", sort=False)["pos"].first(),
    })
    evaluated = users["n_positives"] >= min_positives
    users.loc[~evaluated, ["validation_pos", "test_pos"]] = -1
    all_users = pd.Index(pd.unique(ordered["user_id"]), name="user_id")
    users = users.reindex(all_users).fillna({"n_positives": 0, "validation_pos": -1, "test_pos": -1})
    users = users.astype({"n_positives": "int64", "validation_pos": "int64", "test_pos": "int64"}).reset_index()
    return Split(events=ordered, users=users[["user_id", "n_positives", "validation_pos", "test_pos"]])
