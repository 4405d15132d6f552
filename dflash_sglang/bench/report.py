# SPDX-License-Identifier: Apache-2.0
"""The benchmark's outputs: the environment it ran in, the JSON result, and the PNG plot.

The JSON holds ``settings``, ``environment`` (machine, GPU, git commit, package versions), one entry per
(prompt set, concurrency) in ``runs`` (both endpoints' statistics, the speedup, the lossless check and the
per-request records), and the overall ``lossless`` verdict. The PNG has three panels: throughput by
concurrency (DFLASH solid, baseline dashed), acceptance length by prompt set, speedup by concurrency.
"""

from __future__ import annotations

import os
import subprocess
from typing import Sequence

from dflash_sglang.bench.provenance import provenance


def environment() -> dict:
    """What the client ran on (``dflash_sglang.bench.provenance``), plus the GPU names ``nvidia-smi`` lists (the
    servers' GPUs when they run on this machine; empty without one)."""
    return {**provenance(), "gpus": _gpu_names()}


def _gpu_names() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def plot(result: dict, path: str) -> None:
    """Writes the three-panel PNG of ``result`` (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    datasets = list(dict.fromkeys(run["dataset"] for run in runs))
    levels = sorted({run["concurrency"] for run in runs})
    colors = {name: f"C{i}" for i, name in enumerate(datasets)}
    by_key = {(run["dataset"], run["concurrency"]): run for run in runs}
    fig, (ax_tput, ax_accept, ax_speed) = plt.subplots(1, 3, figsize=(17, 5.2))

    for name in datasets:
        points = [(c, by_key[name, c]) for c in levels if (name, c) in by_key]
        xs = [c for c, _ in points]
        ax_tput.plot(xs, [r["speculative"]["throughput_tok_s"] for _, r in points], "o-", color=colors[name],
                     label=f"{name} DFLASH")
        if all(r.get("baseline") for _, r in points):
            ax_tput.plot(xs, [r["baseline"]["throughput_tok_s"] for _, r in points], "s--", color=colors[name],
                         alpha=0.6, label=f"{name} baseline")
    ax_tput.set(title="Output throughput", xlabel="concurrency", ylabel="tokens / s")
    ax_tput.set_ylim(bottom=0, top=ax_tput.get_ylim()[1] * 1.1)
    _concurrency_axis(ax_tput, levels)
    ax_tput.legend(fontsize=8)

    shades = [matplotlib.colormaps["Blues"](0.35 + 0.55 * j / max(len(levels) - 1, 1)) for j in range(len(levels))]
    _grouped_bars(ax_accept, datasets, levels, lambda d, c: by_key.get((d, c), {}).get("speculative", {})
                  .get("accept_length"), "c={}", "{:.2f}", shades)
    ax_accept.set(title="Acceptance length (tokens per verify step)", xlabel="prompt set", ylabel="tokens / step")
    _grouped_bars(ax_speed, [str(c) for c in levels], datasets,
                  lambda c, d: by_key.get((d, int(c)), {}).get("speedup"), "{}", "{:.2f}x",
                  [colors[name] for name in datasets])
    ax_speed.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    if not any(run["speedup"] for run in runs):
        ax_speed.text(0.5, 0.5, "no baseline endpoint", transform=ax_speed.transAxes, ha="center", fontsize=12)
    ax_speed.set(title="Speedup vs baseline (same run)", xlabel="concurrency", ylabel="DFLASH / baseline throughput")

    settings, env = result["settings"], result["environment"]
    where = ", ".join(env["gpus"]) or f"CPU ({env['cpus']} cores)"
    lossless = result["lossless"]
    verdict = ("lossless: identical" if lossless["passed"] else
               f"lossless: {lossless['mismatched']} MISMATCH(ES)") if lossless["checked"] else "lossless: not checked"
    fig.suptitle(f"{settings['deployment']}  |  {where}  |  max {settings['max_tokens']} tokens, greedy, "
                 f"thinking {'on' if settings['enable_thinking'] else 'off'}  |  {verdict}", fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _concurrency_axis(ax, levels: Sequence[int]) -> None:
    if len(levels) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(list(levels), [str(c) for c in levels])
    ax.minorticks_off()
    ax.grid(alpha=0.3)


def _grouped_bars(ax, groups: Sequence, members: Sequence, value, member_label: str, value_format: str,
                  member_colors: Sequence) -> None:
    """One bar per (group, member) at x = group; missing values are marked "n/a"."""
    width = 0.8 / max(len(members), 1)
    for j, member in enumerate(members):
        for i, group in enumerate(groups):
            x = i + (j - (len(members) - 1) / 2) * width
            y = value(group, member)
            if y is None:
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=8)
                continue
            ax.bar(x, y, width, color=member_colors[j], label=member_label.format(member) if i == 0 else None)
            ax.text(x, y, value_format.format(y), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(groups)), [str(g) for g in groups])
    ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.15)  # room for the value labels and the legend
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
