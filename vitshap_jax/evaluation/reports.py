"""What an evaluation writes: the markdown tables and the result files (JSON written atomically)."""

from __future__ import annotations

import os

import numpy as np

from vitshap_jax.files import write_json

COLUMNS = (
    ("mse", "MSE vs truth", "{:.2e}"),
    ("pearson", "Pearson", "{:.3f}"),
    ("spearman", "Spearman", "{:.3f}"),
    ("overlap", "top-k overlap", "{:.3f}"),
    ("insertion_auc", "insertion AUC (higher better)", "{:.3f}"),
    ("deletion_auc", "deletion AUC (lower better)", "{:.3f}"),
    ("seconds_per_image", "s / image", "{:.2g}"),
)


def table(results: dict) -> str:
    """The evaluation's comparison as a markdown table (one row per method)."""
    gt = results["ground_truth"]
    lines = [
        f"{results['num_images']} {results['split']} images, {results['players']} patches; explained class: "
        f"{results['explain_class']}; ground truth: {gt['method']} ({gt['evals_per_image']:,} evaluations, "
        f"{gt['seconds_per_image']:.2g} s per image); top-k with k = {results['top_k']}",
        "",
        "| method | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for name, m in results["methods"].items():
        cells = [
            fmt.format(m[key]) if m.get(key) is not None and np.isfinite(m[key]) else "n/a"
            for key, _, fmt in COLUMNS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def roar_table(fractions, lines: dict) -> str:
    """ROAR: test accuracy of the retrained classifier, one row per method, one column per removed share."""
    header = "| method | " + " | ".join(f"{f:g} removed" for f in fractions) + " |"
    rows = [header, "|---" * (len(fractions) + 1) + "|"]
    rows += [f"| {name} | " + " | ".join(f"{a:.3f}" for a in acc) + " |" for name, acc in lines.items()]
    return "\n".join(rows)


def write_table(out_dir: str, text: str) -> None:
    """`{out_dir}/table.md`: a markdown table (`text`)."""
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(text + "\n")


def write_report(out_dir: str, results: dict, text: str, **arrays) -> None:
    """`{out_dir}/results.json`, `table.md` (`text`) and, given `arrays`, `values.npz`."""
    write_table(out_dir, text)
    write_json(os.path.join(out_dir, "results.json"), results)
    if arrays:
        np.savez(os.path.join(out_dir, "values.npz"), **arrays)
