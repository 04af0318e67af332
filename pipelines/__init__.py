"""KFP pipeline definitions over `components/`; see pipelines/README.md."""

from pipelines.daily import build_pipeline

__all__ = ["build_pipeline"]
