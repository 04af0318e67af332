"""LEADRE's Feast objects: what the recall, near-line and ranking services read and write.

The parquet files under data/ are written by `leadre features apply|materialize --data DIR` from a canonical data
directory; the recall lists arrive through the push source. A TTL of zero keeps values until overwritten: staleness
is the reader's decision (the recall service compares `generated_at` with its own limit).
"""

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, Project, PushSource, ValueType
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Array, Bool, Float64, Int64, String, UnixTimestamp

project = Project(name="leadre", description="Generative ad recall: user features, ad status, recall lists")

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING)
ad = Entity(name="ad", join_keys=["ad_id"], value_type=ValueType.STRING)


def parquet_source(name: str) -> FileSource:
    """data/<name>.parquet, relative to the repository; `leadre features` writes it."""
    return FileSource(name=f"{name}_source", path=f"data/{name}.parquet", timestamp_field="event_timestamp")


# Datasets name different profile fields (age bucket, region, ... or MovieLens' occupation, zip); one JSON object
# keeps the schema fixed for every dataset, and the prompt renders the fields in the order they are stored.
user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=timedelta(0),
    schema=[Field(name="profile", dtype=String, description="JSON object: profile field -> value, as strings")],
    source=parquet_source("user_profile"),
)

# Built with leadre.bundle.history_from_events' rules (positive ads without repeats, contents, stable time order),
# so the near-line prompt sees what training saw; the event timestamp is the user's latest event.
user_behaviour = FeatureView(
    name="user_behaviour",
    entities=[user],
    ttl=timedelta(0),
    schema=[
        Field(name="recent_ads", dtype=Array(String), description="positive ad interactions, oldest first (capped)"),
        Field(name="recent_contents", dtype=Array(String), description="content interactions, oldest first (capped)"),
        Field(name="n_recent_ads", dtype=Int64, description="length of recent_ads (what the recall service logs)"),
        Field(name="n_recent_contents", dtype=Int64, description="length of recent_contents"),
    ],
    source=parquet_source("user_behaviour"),
)

ad_status = FeatureView(
    name="ad_status",
    entities=[ad],
    ttl=timedelta(0),
    schema=[Field(name="active", dtype=Bool), Field(name="ecpm", dtype=Float64)],
    source=parquet_source("ad_status"),
)

# The near-line service pushes each user's list straight to the online store; the batch source only gives the
# push source its schema (and a place for offline copies).
recall_push = PushSource(name="recall_push", batch_source=parquet_source("recall_list"))

recall_list = FeatureView(
    name="recall_list",
    entities=[user],
    ttl=timedelta(0),
    schema=[
        Field(name="ad_ids", dtype=Array(String), description="recalled ads, best first"),
        Field(name="scores", dtype=Array(Float64), description="the model's score of each ad (log-probability)"),
        Field(name="model_version", dtype=String, description="bundle model version that generated the list"),
        Field(name="generated_at", dtype=UnixTimestamp, description="when the near-line service made the list"),
    ],
    source=recall_push,
)


# For ranking models: the 1-based rank of each recalled ad. (No field description: Feast 0.67 drops those of
# on-demand views from the registry, and the feature service's copy would then no longer match.)
@on_demand_feature_view(
    sources=[recall_list[["ad_ids"]]],
    schema=[Field(name="ranks", dtype=Array(Int64))],
    mode="python",
)
def recall_ranks(inputs: dict) -> dict:
    return {"ranks": [list(range(1, len(ads or []) + 1)) for ads in inputs["ad_ids"]]}


recall_service = FeatureService(name="recall_service", features=[recall_list, ad_status])
nearline_service = FeatureService(name="nearline_service", features=[user_profile, user_behaviour])
ranking_service = FeatureService(name="ranking_service", features=[recall_list[["ad_ids", "scores", "model_version"]],
                                                                   recall_ranks])
