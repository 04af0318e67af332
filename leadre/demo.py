"""`leadre demo`: the README's main job, end to end on the embedded synthetic marketplace.

It runs every step that exists so far, in pipeline order, and says what each produced.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from leadre.schema import write_data_dir
from leadre.stats import data_stats, format_stats
from leadre.synth import POSITIVE_ACTIONS, SynthConfig, generate, synth_parameters

log = logging.getLogger(__name__)


def run_demo(out: Path, users: int = 2000, seed: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = SynthConfig(users=users, seed=seed)
    tables = write_data_dir(generate(cfg), out / "data", "data synth", synth_parameters(cfg), POSITIVE_ACTIONS)
    print(f"[data] synthetic marketplace -> {out / 'data'} ({time.perf_counter() - t0:.1f}s)")
    print(format_stats(data_stats(tables, list(POSITIVE_ACTIONS))))
