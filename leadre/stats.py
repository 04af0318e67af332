"""`leadre data stats`: what a data directory holds, in numbers a person can check at a glance."""

from __future__ import annotations

from typing import Any

import numpy as np

from leadre.schema import Tables
from leadre.split import SplitSettings, leave_one_out


def _distribution(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"n": 0}
    q = np.percentile(values, [0, 25, 50, 75, 90, 99, 100])
    return {"n": int(len(values)), "mean": round(float(values.mean()), 2),
            **{k: float(v) for k, v in zip(("min", "p25", "median", "p75", "p90", "p99", "max"), q)}}


def data_stats(tables: Tables, settings: SplitSettings, top: int = 10) -> dict[str, Any]:
    """Counts and distributions; `evaluated_users` under the split the data step recorded (`settings`)."""
    split = leave_one_out(tables.events, settings.positive_actions, settings.min_positives)
    ev = split.events
    pos = ev[ev["positive"]]
    n_users, n_ads = len(tables.users), len(tables.ads)
    per_user = pos.groupby("user_id").size().reindex(tables.users["user_id"], fill_value=0).to_numpy()
    ad_events = ev[ev["item_type"] == "ad"]
    category = pos["item_id"].map(tables.ads.set_index("ad_id")["category"])
    return {
        "counts": {
            "users": n_users, "ads": n_ads, "active_ads": int(tables.ads["active"].sum()),
            "contents": len(tables.contents), "events": len(ev), "ad_events": len(ad_events),
            "content_events": len(ev) - len(ad_events), "positive_ad_interactions": len(pos),
            "evaluated_users": int((split.users["test_pos"] >= 0).sum()),
        },
        "actions": ev.groupby(["item_type", "action"]).size().rename("n").reset_index().to_dict("records"),
        "positives_per_user": _distribution(per_user),
        "events_per_user": _distribution(ev.groupby("user_id").size().to_numpy()),
        "sparsity": round(1.0 - pos[["user_id", "item_id"]].drop_duplicates().shape[0] / max(1, n_users * n_ads), 6),
        "ads_with_positives": int(pos["item_id"].nunique()),
        "time_span": {"first": str(ev["ts"].min()), "last": str(ev["ts"].max())},
        "category_mix": {
            "catalogue": tables.ads["category"].value_counts(normalize=True).head(top).round(4).to_dict(),
            "positives": category.value_counts(normalize=True).head(top).round(4).to_dict(),
        },
        "ecpm": _distribution(tables.ads["ecpm"].to_numpy()),
    }


def format_stats(stats: dict[str, Any]) -> str:
    lines = ["counts:"] + [f"  {k:<26} {v:>12,}" for k, v in stats["counts"].items()]
    for name in ("positives_per_user", "events_per_user", "ecpm"):
        d = stats[name]
        lines.append(f"{name}: " + "  ".join(f"{k}={v:g}" for k, v in d.items()))
    lines.append(f"sparsity: {stats['sparsity']:.4%}   ads with positives: {stats['ads_with_positives']:,}")
    lines.append(f"time span: {stats['time_span']['first']} .. {stats['time_span']['last']}")
    lines.append("actions: " + ", ".join(f"{a['item_type']}/{a['action']}={a['n']:,}" for a in stats["actions"]))
    for where, mix in stats["category_mix"].items():
        lines.append(f"category mix ({where}): " + ", ".join(f"{k} {v:.1%}" for k, v in mix.items()))
    return "\n".join(lines)
