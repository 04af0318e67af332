"""KFP v2 components, one per pipeline step (DESIGN §4); see components/README.md."""

from components.steps import (IMAGE, bundle, compile_model, deploy, dpo, evaluate, gate, ingest, nearline, prompts,
                              semantic_ids, sft)

__all__ = ["IMAGE", "ingest", "semantic_ids", "prompts", "sft", "dpo", "evaluate", "gate", "compile_model", "bundle",
           "nearline", "deploy"]
