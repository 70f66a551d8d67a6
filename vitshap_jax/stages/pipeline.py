"""The main job: classifier -> surrogate -> explainer in one workdir.

A stage whose run finished (all steps done and `results.json` written) with the same settings, from
the current upstream run, is skipped; an unfinished one resumes from its latest checkpoint; one with
other settings is refused (or with `--config.<stage>.restart=True` moved aside and trained afresh), and
a stage whose upstream was trained again is trained again too (the old run moved aside). Prints a
summary and where everything is.
"""

from __future__ import annotations

import json
import os

import jax
from absl import logging

from vitshap_jax import checkpoints as ckpt_lib
from vitshap_jax.config import STAGES
from vitshap_jax.files import absolute
from vitshap_jax.stages import common, get_stage
from vitshap_jax.train.loop import is_complete

ORDER = STAGES


def run(config, workdir: str, mesh) -> dict:
    results = {}
    for i, stage in enumerate(ORDER):
        results[stage] = run_stage(stage, config[stage], workdir, mesh, ORDER[i - 1] if i else None)
    if jax.process_index() == 0:
        print(summary(results))
    return results


def run_stage(stage: str, c, workdir: str, mesh, upstream_stage: str | None = None) -> dict:
    """Runs one stage into `{workdir}/{stage}` under the rules above (skipped when finished with the same
    settings from the current upstream run) and returns its results."""
    stage_path = os.path.join(absolute(workdir), stage)
    results_file = os.path.join(stage_path, "results.json")
    upstream = common.upstream_config(c, workdir, upstream_stage) if upstream_stage else None
    recorded = (
        ckpt_lib.read_config(stage_path)
        if os.path.exists(os.path.join(stage_path, ckpt_lib.CONFIG_FILE))
        else None
    )
    if recorded and upstream and recorded.get("upstream_run_id", "") not in ("", upstream.get("run_id")):
        logging.info("%s: trained from an earlier %s run; training it again", stage, upstream_stage)
        c.restart = True  # the old run is moved aside, not deleted
    if recorded and not c.restart and is_complete(stage_path) and os.path.exists(results_file):
        common.resolve(c, upstream)
        if not common.settings_diff(recorded, c.to_dict()):
            logging.info("%s: finished earlier in %s, skipped", stage, stage_path)
            with open(results_file) as f:
                return json.load(f)
    return get_stage(stage)(c, workdir, mesh)  # with other settings, the stage refuses (or restarts)


def summary(results: dict) -> str:
    c, s, e = (results[k]["test"] for k in ORDER)
    held_out = " / ".join(f"{s[f'accuracy_heldout_{f}']:.4f}" for f in ("0.00", "0.50", "0.90"))
    lines = [
        "vitshap_jax pipeline finished (test split):",
        f"  classifier  accuracy {c['accuracy']:.4f}" + (f", AUROC {c['auroc']:.4f}" if "auroc" in c else ""),
        f"  surrogate   KL {s['kl']:.4f}; accuracy with 0% / 50% / 90% of patches held out: {held_out}",
        f"  explainer   loss {e['loss']:.5f}, efficiency gap {e['efficiency_gap']:.2e}",
        "results and checkpoints:",
    ]
    lines += [f"  {os.path.join(results[k]['path'], 'results.json')}" for k in ORDER]
    return "\n".join(lines)
