"""The recall bundle: the one directory serving, the pipeline and the demo load (DESIGN §4, step 8).

A bundle holds the promoted model, its S-ID artifact, the prompt settings the model was trained with, the ad
catalogue snapshot (ads with text, eCPM and status; contents), the recall service's fallback ranking (segment
popularity, `SegmentPopularity`) and, optionally, a compiled backend. Its manifest
names every file by its SHA-256 and the model by a version derived from its weights, never by a path, so a
bundle copied to another machine or pod loads as it is and a damaged copy is refused.

`RecallBundle.recall` is the library entry point that serving and the demo share: users' histories → the same
`build_prompt` as training → trie-constrained search over the active ads → ads with scores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from leadre.artifacts import MANIFEST, ArtifactError, read_manifest, write_artifact
from leadre.prompts import PromptCatalogue, PromptConfig, UserHistory, build_prompt
from leadre.recall import LLMRecaller
from leadre.schema import read_data_dir, split_settings_of
from leadre.sid import SidTable, load_sid_table
from leadre.split import mark_positives, order_events

log = logging.getLogger(__name__)

STEP = "bundle"
MODEL, SIDS, COMPILED = "model", "sids", "compiled"
ADS, CONTENTS, POPULARITY = "ads.parquet", "contents.parquet", "popularity.parquet"
CATALOGUE_COLUMNS = ("ad_id", "title", "description", "category", "advertiser", "ecpm", "active")


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_hashes(root: Path) -> dict[str, str]:
    """Every file's SHA-256 but the bundle's own manifest (the nested artifacts' manifests are content too)."""
    return {str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file() and p != root / MANIFEST}


def model_version(model_dir: str | Path, stage: str) -> str:
    """`<stage>-<first 12 hex digits of the weights' SHA-256>`: the same weights give the same version anywhere."""
    weights = sorted(Path(model_dir).glob("*.safetensors"))
    if not weights:
        raise ArtifactError(f"{model_dir}: no *.safetensors weights")
    digest = hashlib.sha256("".join(_sha256(w) for w in weights).encode()).hexdigest()
    return f"{stage}-{digest[:12]}"


def build_bundle(model_dir: str | Path, sids_dir: str | Path, data_dir: str | Path, out: str | Path,
                 compiled_dir: str | Path | None = None, segment_fields: Sequence[str] = ()) -> dict[str, Any]:
    """`leadre bundle`: copy the model, S-IDs, catalogue snapshot (and compiled backend) into one artifact, with
    the recall service's fallback: segment popularity by `segment_fields` (default: the first profile field)."""
    from leadre.model import METADATA, _require_safetensors

    model_dir, sids_dir = Path(model_dir), Path(sids_dir)
    _require_safetensors(model_dir)
    if not (model_dir / METADATA).is_file():
        raise ArtifactError(f"{model_dir}: no {METADATA}; not a model directory written by LEADRE's training")
    metadata = json.loads((model_dir / METADATA).read_text())
    sids = load_sid_table(sids_dir)
    if list(sids.level_sizes) != list(metadata["level_sizes"]):
        raise ArtifactError(f"{model_dir} knows S-ID levels {metadata['level_sizes']}, but {sids_dir} has "
                            f"{list(sids.level_sizes)}: bundle the S-IDs the model was trained with")
    split = split_settings_of(data_dir)
    split.check(metadata.get("split"), f"model {model_dir}")  # the catalogue must come from the data it learned
    tables = read_data_dir(data_dir)
    missing = sorted(set(tables.ads["ad_id"]) - set(sids.ad_ids))
    if missing:
        raise ArtifactError(f"{len(missing)} ads of {data_dir} have no S-ID in {sids_dir} (e.g. {missing[:3]}); "
                            "run `leadre sids assign` for new ads first")
    profile_fields = [c for c in tables.users.columns if c != "user_id"]
    segment_fields = list(segment_fields) or profile_fields[:1]
    shares = segment_shares(tables.users, tables.events, split.positive_actions, segment_fields, tables.ads)
    stage = metadata.get("stage", "model")
    version = model_version(model_dir, stage)
    if compiled_dir is not None:
        compiled = read_manifest(compiled_dir, "compile")
        if compiled.get("model_version") not in (None, version):
            raise ArtifactError(f"{compiled_dir} was compiled from model {compiled.get('model_version')}, not from {model_dir}")
    inputs = {"model": model_dir, "sids": sids_dir, "data": data_dir} | ({"compiled": compiled_dir} if compiled_dir else {})
    with write_artifact(out, STEP, inputs) as (tmp, manifest):
        shutil.copytree(model_dir, tmp / MODEL)
        shutil.copytree(sids_dir, tmp / SIDS)
        if compiled_dir is not None:
            shutil.copytree(compiled_dir, tmp / COMPILED)
        tables.ads[list(CATALOGUE_COLUMNS)].to_parquet(tmp / ADS, index=False)
        tables.contents[["content_id", "title", "category"]].to_parquet(tmp / CONTENTS, index=False)
        shares.to_parquet(tmp / POPULARITY, index=False)
        manifest.update({
            "model_version": version,
            "stage": stage,
            "level_sizes": list(sids.level_sizes),
            "prompt_config": metadata.get("prompt_config", {}),
            "positive_actions": list(split.positive_actions),
            "split": split.as_dict(),
            "profile_fields": profile_fields,
            "segment_fields": segment_fields,
            "compiled": compiled_dir is not None,
            "files": _file_hashes(tmp),
            "counts": {"ads": len(tables.ads), "active_ads": int(tables.ads["active"].sum()),
                       "contents": len(tables.contents)},
        })
    log.info("bundle: %s (%d ads) -> %s", version, len(tables.ads), out)
    return manifest


def read_bundle_manifest(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The bundle's manifest; with `verify`, every file is checked against its recorded SHA-256."""
    path = Path(path)
    manifest = read_manifest(path, STEP)
    if verify:
        recorded, found = manifest["files"], _file_hashes(path)
        bad = sorted(f for f in recorded if found.get(f) != recorded[f])
        if bad:
            raise ArtifactError(f"{path}: damaged bundle: {len(bad)} file(s) missing or changed (e.g. {bad[:3]})")
    return manifest


def history_from_events(user_id: str, profile: dict[str, Any], events: pd.DataFrame, positive_actions: Iterable[str],
                        known_ads: Iterable[str] | set[str], known_contents: Iterable[str] | set[str]) -> tuple[UserHistory, int]:
    """A user's live history from raw events (`item_id`, `item_type`, `action`, `ts`), without the evaluation split:
    positive ad interactions and content interactions in stable time order, as training saw them. Items the bundle
    does not know (ads created after it was built) are skipped; returns the history and how many were skipped."""
    known_ads, known_contents = set(known_ads), set(known_contents)
    if len(events) == 0:
        return UserHistory(user_id, {k: str(v) for k, v in profile.items()}), 0
    ordered = order_events(events.assign(user_id=user_id))
    positive = mark_positives(ordered, list(positive_actions))
    ads = ordered.loc[positive, "item_id"].tolist()
    contents = ordered.loc[ordered["item_type"] == "content", "item_id"].tolist()
    kept_ads = [a for a in ads if a in known_ads]
    kept_contents = [c for c in contents if c in known_contents]
    skipped = len(ads) - len(kept_ads) + len(contents) - len(kept_contents)
    return UserHistory(user_id, {k: str(v) for k, v in profile.items()}, kept_ads, kept_contents), skipped


@dataclass(frozen=True)
class SegmentPopularity:
    """The recall service's fallback ranking: per segment (the values of the `fields` profile fields), ads by their
    share of positive interactions in that segment, then the ads it never engaged with by eCPM. Users of an unknown
    segment get the overall ranking. A bundle stores the shares (`POPULARITY`); the tails come from its catalogue."""

    fields: tuple[str, ...]
    by_segment: dict[tuple[str, ...], list[tuple[str, float]]]
    overall: list[tuple[str, float]]

    @classmethod
    def from_catalogue(cls, ads: pd.DataFrame) -> SegmentPopularity:
        """Without interactions: one ranking by eCPM (score: eCPM over the highest eCPM)."""
        ranked = ads.sort_values(["ecpm", "ad_id"], ascending=[False, True])
        top = float(ranked["ecpm"].max()) or 1.0
        return cls((), {}, [(a, float(e) / top) for a, e in zip(ranked["ad_id"], ranked["ecpm"])])

    @classmethod
    def from_data(cls, users: pd.DataFrame, events: pd.DataFrame, positive_actions: Iterable[str],
                  fields: Sequence[str], ads: pd.DataFrame) -> SegmentPopularity:
        """From a data directory's users and events, over the catalogue `ads`."""
        return cls.from_shares(fields, segment_shares(users, events, positive_actions, fields, ads), ads)

    @classmethod
    def from_shares(cls, fields: Sequence[str], shares: pd.DataFrame, ads: pd.DataFrame) -> SegmentPopularity:
        """From `segment_shares`' frame (as a bundle stores it) over the catalogue `ads`."""
        tail = cls.from_catalogue(ads).overall
        rankings: dict[tuple[str, ...], list[tuple[str, float]]] = {}
        for segment, ad, share in zip(shares["segment"], shares["ad_id"], shares["share"]):
            rankings.setdefault(tuple(segment), []).append((ad, float(share)))
        for key, seen in rankings.items():
            known = {a for a, _ in seen}
            rankings[key] = seen + [(a, 0.0) for a, _ in tail if a not in known]
        overall = rankings.pop((), tail)
        return cls(tuple(fields), rankings, overall)

    def segment(self, profile: dict[str, Any] | None) -> tuple[str, ...] | None:
        if not self.fields or not profile or any(f not in profile for f in self.fields):
            return None
        return tuple(str(profile[f]) for f in self.fields)

    def top(self, profile: dict[str, Any] | None, k: int, active: frozenset[str] | set[str],
            exclude: Iterable[str] = ()) -> list[tuple[str, float]]:
        """The `k` best active ads for the user's segment, not in `exclude`."""
        ranking = self.by_segment.get(self.segment(profile), self.overall)
        skip = set(exclude)
        out = []
        for ad, score in ranking:
            if ad in active and ad not in skip:
                out.append((ad, score))
                if len(out) == k:
                    break
        return out


def segment_shares(users: pd.DataFrame, events: pd.DataFrame, positive_actions: Iterable[str], fields: Sequence[str],
                   ads: pd.DataFrame) -> pd.DataFrame:
    """Per segment (`segment`: the list of the users' `fields` values as strings; [] for everyone), the ads of
    `ads` with positive interactions and their `share` of the segment's, best first (ties by ad id)."""
    fields = list(fields)
    missing = sorted(set(fields) - set(users.columns))
    if missing:
        raise ValueError(f"segment fields {missing} are not profile fields (known: {list(users.columns[1:])})")
    positive = events[(events["item_type"] == "ad") & events["action"].isin(list(positive_actions))]
    positive = positive[positive["item_id"].isin(set(ads["ad_id"]))]
    joined = positive[["user_id", "item_id"]].merge(users[["user_id", *fields]], on="user_id")
    groups = [((), joined)] + ([(k if isinstance(k, tuple) else (k,), g) for k, g in joined.groupby(fields)]
                               if fields else [])
    frames = []
    for key, group in groups:
        counts = group["item_id"].value_counts().sort_index().sort_values(ascending=False, kind="stable")
        frames.append(pd.DataFrame({"segment": [[str(v) for v in key]] * len(counts), "ad_id": counts.index,
                                    "share": (counts / counts.sum()).to_numpy()}))
    return pd.concat(frames, ignore_index=True)


@dataclass(frozen=True)
class RecallBundle:
    """A loaded bundle. Frozen: `with_status` returns a new one sharing the model, so a server swaps one
    reference and a search in flight keeps the trie and catalogue it started with."""

    path: Path
    manifest: dict[str, Any]
    recaller: LLMRecaller
    prompt_config: PromptConfig
    prompt_catalogue: PromptCatalogue
    sids: SidTable
    ads: pd.DataFrame  # indexed by ad_id: title, description, category, advertiser, ecpm, active
    contents: pd.DataFrame  # content_id, title, category
    popularity: SegmentPopularity  # the fallback ranking (by eCPM for a bundle built before it stored one)

    @property
    def model_version(self) -> str:
        return self.manifest["model_version"]

    @property
    def positive_actions(self) -> list[str]:
        return self.manifest["positive_actions"]

    @classmethod
    def load(cls, path: str | Path, verify: bool = True, batch_size: int = 32, device: str = "auto",
             backend: str = "auto") -> RecallBundle:
        """A bundle ready to recall on `device` (auto | cpu | cuda) through `backend` (auto, or one of
        leadre.backends.BACKENDS; the compiled ones use the bundle's `compiled/`). See `LLMRecaller.from_dir`."""
        path = Path(path)
        manifest = read_bundle_manifest(path, verify)
        sids = load_sid_table(path / SIDS)
        ads = pd.read_parquet(path / ADS)
        contents = pd.read_parquet(path / CONTENTS)
        active = ads.loc[ads["active"], "ad_id"]
        compiled = path / COMPILED if (path / COMPILED).is_dir() else None
        recaller = LLMRecaller.from_dir(path / MODEL, sids, active, batch_size=batch_size, device=device,
                                        backend=backend, compiled_dir=compiled)
        popularity = (SegmentPopularity.from_shares(manifest["segment_fields"], pd.read_parquet(path / POPULARITY), ads)
                      if (path / POPULARITY).is_file() else SegmentPopularity.from_catalogue(ads))
        return cls(path, manifest, recaller, PromptConfig(**manifest["prompt_config"]),
                   PromptCatalogue.build(ads, contents, sids), sids, ads.set_index("ad_id", drop=False), contents,
                   popularity)

    def history(self, user_id: str, profile: dict[str, Any], events: pd.DataFrame) -> tuple[UserHistory, int]:
        """`history_from_events` against this bundle's catalogue."""
        return history_from_events(user_id, profile, events, self.positive_actions, self.prompt_catalogue.sid,
                                   self.prompt_catalogue.content_label)

    def recall(self, histories: Sequence[UserHistory], k: int, beam_width: int | None = None,
               exclude_seen: bool = False) -> list[list[tuple[str, float]]]:
        """Per user, the top `k` active ads with their scores (log-probabilities), best first."""
        prompts = [build_prompt(h, self.prompt_catalogue, self.prompt_config) for h in histories]
        exclude = [h.ads for h in histories] if exclude_seen else None
        return self.recaller.recall(prompts, top_n=k, beam_width=beam_width, exclude=exclude)

    def with_status(self, ads: pd.DataFrame, sids: SidTable | None = None) -> RecallBundle:
        """The same model over a new catalogue: `ads` (at least ad_id, active; new ads also need their text and
        eCPM) replaces the status and eCPM of known ads and adds new ones, whose S-IDs come from `sids` (an
        assignment from the frozen codebooks, e.g. `sids assign`). Paused ads leave the trie at once."""
        ads = ads.set_index("ad_id", drop=False)
        catalogue = self.ads.copy()
        known = ads.index.intersection(catalogue.index)
        for column in ("active", "ecpm"):
            if column in ads:
                catalogue.loc[known, column] = ads.loc[known, column]
        new = ads.index.difference(catalogue.index)
        trie, table, prompt_catalogue = self.recaller.trie, self.sids, self.prompt_catalogue
        if len(new):
            if sids is None or sids.level_sizes != self.sids.level_sizes:
                raise ValueError(f"{len(new)} new ads (e.g. {list(new[:3])}) need S-IDs from this bundle's codebooks")
            missing_cols = sorted(set(CATALOGUE_COLUMNS) - set(ads.columns))
            if missing_cols:
                raise ValueError(f"new ads need the columns {missing_cols}")
            no_sid = sorted(set(new) - set(sids.ad_ids))
            if no_sid:
                raise ValueError(f"new ads without an S-ID: {no_sid[:5]}")
            added = ads.loc[new, list(CATALOGUE_COLUMNS)]
            catalogue = pd.concat([catalogue, added])
            rows = sids.rows(list(new))
            trie = trie.with_ads(list(new), sids.codes[rows], active=False)
            table = SidTable(np.concatenate([self.sids.ad_ids, np.asarray(new, dtype=object)]),
                             np.concatenate([self.sids.codes, sids.codes[rows]]), self.sids.level_sizes)
            prompt_catalogue = PromptCatalogue.build(catalogue.reset_index(drop=True), self.contents, table)
        catalogue["active"] = catalogue["active"].astype(bool)
        active = set(catalogue.index[catalogue["active"]])
        trie = trie.with_active(set(trie.ad_ids) & active, True).with_active(set(trie.ad_ids) - active, False)
        return replace(self, recaller=self.recaller.with_trie(trie), sids=table, prompt_catalogue=prompt_catalogue,
                       ads=catalogue)
