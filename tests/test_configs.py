"""Every shipped config reads: each section into its step's settings, the model section against every preset."""

import pytest

from leadre.config import CONFIG_DIR, read_config, section
from leadre.dpo import DPOSettings
from leadre.gate import Policy
from leadre.model import PRESETS, resolve_config
from leadre.monitor import DriftSettings
from leadre.pipeline import CompileSettings, EvalSettings, NearlineSettings
from leadre.prompts import PromptConfig
from leadre.semantic_ids import SidSettings
from leadre.serving import ServingSettings
from leadre.sft import TrainSettings

SECTIONS = {"sids": SidSettings, "prompts": PromptConfig, "sft": TrainSettings, "dpo": DPOSettings,
            "evaluate": EvalSettings, "nearline": NearlineSettings, "compile": CompileSettings,
            "serving": ServingSettings, "monitor": DriftSettings, "gate": Policy}


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_reads(path):
    config = read_config(path)
    assert set(config) <= set(SECTIONS) | {"model"}, f"{path.name}: sections no step reads"
    for name, cls in SECTIONS.items():
        section(config, name, cls, str(path))
    for preset in PRESETS:
        resolve_config(preset, config.get("model"))
