"""The main job: classifier -> surrogate -> explainer in one workdir.

A stage whose run finished (all steps done and `results.json` written) is skipped; an unfinished one
resumes from its latest checkpoint. Prints a summary and where everything is.
"""

from __future__ import annotations

import json
import os

import jax
from absl import logging

from vitshap_jax.stages import get_stage
from vitshap_jax.train.loop import is_complete

ORDER = ("classifier", "surrogate", "explainer")


def run(config, workdir: str, mesh) -> dict:
    results = {}
    for stage in ORDER:
        stage_path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), stage)
        results_file = os.path.join(stage_path, "results.json")
        if is_complete(stage_path) and os.path.exists(results_file):
            logging.info("%s: finished earlier in %s, skipped", stage, stage_path)
            with open(results_file) as f:
                results[stage] = json.load(f)
            continue
        results[stage] = get_stage(stage)(config[stage], workdir, mesh)
    if jax.process_index() == 0:
        print(summary(results))
    return results


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
