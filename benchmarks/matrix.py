"""The overview page across the kernel matrix: doc/benchmarks.md, rendered from every kernel's results.

Each kernel target has its own results file and page (``doc/benchmarks/<kernel>/results.json`` and
``doc/benchmarks/<kernel>.md``, written by ``benchmarks/run --kernel <kernel>``). This page puts the
issue's targets side by side for all of them, says which were missed on which kernel and why, and
shows the host-side benchmarks (update-img, guest boot) once, from the newest run that measured them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from benchmarks import runner
from benchmarks.runner import (
    DM_FIRST_WRITE,
    FIRST_WRITE,
    TARGETS,
    THIN_FIRST_WRITE,
    case_map,
    fmt,
    md_table,
)

RESULTS_NAME = "results.json"
KERNEL_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def kernel_key(kernel: str) -> tuple[tuple[int, ...], str]:
    """debian-5.10 < debian-6.1 < debian-6.12 < debian-6.12-debug < debian-7.2."""
    m = re.search(r"(\d+(?:\.\d+)*)", kernel)
    version = tuple(int(x) for x in m.group(1).split(".")) if m else ()
    return version, kernel


def load_all(root: Path) -> dict[str, dict[str, Any]]:
    """Every kernel's results under root (root/<kernel>/results.json), in kernel version order.
    A file that cannot be read is left out with a message rather than failing the whole page."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(root.glob(f"*/{RESULTS_NAME}")):
        try:
            found[path.parent.name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"benchmarks: skipping {path}: {e}; run benchmarks/run --kernel {path.parent.name} again")
    return {k: found[k] for k in sorted(found, key=kernel_key)}


def page_of(kernel: str, doc_path: Path) -> str:
    """The kernel's own page, relative to the overview."""
    return f"{doc_path.with_suffix('').name}/{kernel}.md"


# ---------------------------------------------------------------- write overhead


def miss_kind(value: float, goal: float, noise: float | None) -> str:
    """'' when met, 'noise' when missed by less than the run's noise, 'miss' otherwise."""
    if value >= goal:
        return ""
    return "noise" if noise and goal - value <= noise * value else "miss"


def measured_targets(cow: dict[str, Any]) -> bool:
    """Whether a run got as far as any phase with a target (a run that stopped during the first
    writes has its baseline only)."""
    return any(c.get("phase") in TARGETS for c in cow.get("cases", []))


def target_cell(cow: dict[str, Any], job: str) -> str:
    """first write / rewrite / incremental ratios of one job; a miss in bold, a miss within the run's
    noise in italics."""
    cases = case_map(cow)
    noise = runner.noise_of(cow, job)
    parts = []
    for phase, goal in TARGETS.items():
        r = cases.get((phase, job), {}).get("bw_ratio")
        if r is None:
            parts.append("-")
            continue
        kind, text = miss_kind(r, goal, noise), runner.ratio_text(r, goal)
        parts.append({"": text, "noise": f"*{text}*", "miss": f"**{text}**"}[kind])
    return " / ".join(parts)


def peer_cell(cow: dict[str, Any], job: str) -> str:
    """Our first-write ratio against dm-snapshot's and dm-thin's in the same run."""
    cases = case_map(cow)
    values = [
        cases.get((p, job), {}).get("bw_ratio") for p in (FIRST_WRITE, DM_FIRST_WRITE, THIN_FIRST_WRITE)
    ]
    return " / ".join(fmt(v) for v in values)


def all_jobs(cows: dict[str, dict[str, Any]]) -> list[str]:
    """Every job measured on some kernel, in the order of the first kernel that has it."""
    jobs: list[str] = []
    for cow in cows.values():
        jobs += [j for j in runner.job_names(cow) if j not in jobs]
    return jobs


def tally(cow: dict[str, Any]) -> tuple[int, int, int]:
    """(met, missed within noise, missed beyond noise) over the three targets of every job."""
    cases = case_map(cow)
    counts = {"": 0, "noise": 0, "miss": 0}
    for job in runner.job_names(cow):
        for phase, goal in TARGETS.items():
            r = cases.get((phase, job), {}).get("bw_ratio")
            if r is not None:
                counts[miss_kind(r, goal, runner.noise_of(cow, job))] += 1
    return counts[""], counts["noise"], counts["miss"]


def beats_dm(cow: dict[str, Any]) -> tuple[int, int]:
    """(jobs whose first write beat dm-snapshot's, jobs where both were measured)."""
    cases = case_map(cow)
    won = total = 0
    for job in runner.job_names(cow):
        ours = cases.get((FIRST_WRITE, job), {}).get("bw_ratio")
        dm = cases.get((DM_FIRST_WRITE, job), {}).get("bw_ratio")
        if ours is not None and dm is not None:
            total += 1
            won += ours > dm
    return won, total


def misses(cows: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Per target phase: every kernel and job that missed it, with the pair ratios and noise."""
    out: dict[str, list[str]] = {}
    for kernel, cow in cows.items():
        cases = case_map(cow)
        for job in runner.job_names(cow):
            noise = runner.noise_of(cow, job)
            for phase, goal in TARGETS.items():
                c = cases.get((phase, job), {})
                r = c.get("bw_ratio")
                if r is None or r >= goal:
                    continue
                pairs = ", ".join(fmt(x) for x in c.get("paired_bw", []))
                within = " (within its noise)" if miss_kind(r, goal, noise) == "noise" else ""
                noise_text = f"; noise {noise:.0%}" if noise is not None else ""
                noise_text += runner.pair_spread_text(cow, job)
                out.setdefault(phase, []).append(
                    f"{kernel}, {job}: {runner.ratio_text(r, goal)}{within} (pairs {pairs}{noise_text})"
                )
    return out


def matrix_plot(cows: dict[str, dict[str, Any]], plot_dir: Path) -> Path | None:
    """One panel per target (first write, rewrite, incremental): each job's ratio on every kernel,
    grouped by job, with the target as a dashed line."""
    jobs = all_jobs(cows)
    if not jobs:
        return None
    plt = runner.pyplot()
    fig, axes = plt.subplots(len(TARGETS), 1, figsize=(12, 3.2 * len(TARGETS)), sharex=True)
    width = 0.8 / max(len(cows), 1)
    for ax, (phase, goal) in zip(axes, TARGETS.items(), strict=True):
        for k, (kernel, cow) in enumerate(cows.items()):
            cases = case_map(cow)
            xs = [j + (k - (len(cows) - 1) / 2) * width for j in range(len(jobs))]
            ys = [cases.get((phase, job), {}).get("bw_ratio") or 0.0 for job in jobs]
            ax.bar(xs, ys, width=width, color=KERNEL_COLORS[k % len(KERNEL_COLORS)], label=kernel)
        ax.axhline(goal, color="black", linestyle="--", linewidth=1)
        ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
        ax.set_ylabel("throughput / untracked")
        ax.set_title(f"{phase} (dashed: target {goal})", fontsize=10, loc="left")
    # above the first panel, right of its (left-aligned) title: inside, it hid ratios near 1
    axes[0].legend(fontsize=8, ncol=len(cows), loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False)
    axes[-1].set_xticks(range(len(jobs)), [j.replace(" buffered", "\nbuffered") for j in jobs], fontsize=8)
    return runner.save_figure(plt, fig, plot_dir / "matrix_targets.png", dpi=100)


def render_write_overhead(cows: dict[str, dict[str, Any]], doc_path: Path, plot_dir: Path) -> list[str]:
    kernels = list(cows)
    jobs = all_jobs(cows)
    md = [
        "## Write overhead across the kernels",
        "",
        "Throughput of each fio job over its paired untracked reference, from each kernel's own run "
        "(its page has the method, p50/p99 latency and guest CPU ratios, and the plots). Cells: "
        f"first write / rewrite / incremental (targets {' / '.join(str(g) for g in TARGETS.values())}); "
        "**bold**: missed by more than that run's noise; *italics*: missed by less than it.",
        "",
        md_table(["job", *kernels], [[job] + [target_cell(cows[k], job) for k in kernels] for job in jobs]),
        "",
    ]
    tallies = []
    for k in kernels:
        met, noise, miss = tally(cows[k])
        won, total = beats_dm(cows[k])
        tallies.append(
            f"- {k}: {met} of {met + noise + miss} targets met, {noise} missed within the run's noise, "
            f"{miss} beyond it; first write above dm-snapshot's on {won} of {total} jobs"
        )
    md += [*tallies, ""]
    md += [
        "Our first write against the peers' in the same guest run (ours / dm-snapshot / dm-thin; "
        "beating dm-snapshot is a target, dm-thin is a comparison, see a kernel's page for why it "
        "copies less):",
        "",
        md_table(["job", *kernels], [[job] + [peer_cell(cows[k], job) for k in kernels] for job in jobs]),
        "",
    ]
    path = matrix_plot(cows, plot_dir)
    if path:
        md += [f"![targets across the kernels]({os.path.relpath(path, doc_path.parent)})", ""]
    missed = misses(cows)
    if missed:
        md += ["### Missed targets, why, and what would close them", ""]
        for phase, lines in missed.items():
            md += [
                f"**{phase} >= {TARGETS[phase]}**, missed by:",
                "",
                *[f"- {ln}" for ln in lines],
                "",
                f"Why: {runner.WHY[phase]}. What would close it: {runner.CLOSE[phase]}.",
                "",
            ]
    return md


# ---------------------------------------------------------------- snapshot latency


def latency_row(kernel: str, sl: dict[str, Any]) -> list[str]:
    """Slowest median of each ioctl over the volume sizes, and the COW-size target's verdict."""
    pts = runner.latency_points(sl, "volume")
    if not pts:
        return [kernel, "not measured", "", "", ""]

    def cell(op: str) -> str:
        worst = max(pts, key=lambda p: p[op]["median"])
        return f"{runner.ms(worst[op]['median'])} ({worst['size_mib']} MiB, -f {worst['falloc_arg']})"

    verdict = runner.latency_verdict(sl)[0].rsplit(": ", 1)[-1]
    return [kernel, cell("setup"), cell("to_incremental"), cell("to_snapshot"), verdict]


def render_latency(docs: dict[str, dict[str, Any]]) -> list[str]:
    rows = []
    for kernel, doc in docs.items():
        sl = doc.get("benchmarks", {}).get("snapshot_latency", {}).get("results")
        if sl:
            rows.append(latency_row(kernel, sl))
    if not rows:
        return []
    header = [
        "kernel",
        "setup-snapshot, ms",
        "transition-to-incremental, ms",
        "transition-to-snapshot, ms",
        "default COW size on 8 GiB: within 1.5x of -f 32 and under 150 ms",
    ]
    return [
        "## Snapshot creation latency across the kernels",
        "",
        "Slowest median over the volume sizes and both COW sizes (a fixed `-f` and the default 10 %), "
        "nothing subtracted (volume and `-f` in brackets). Each kernel's page has every point and the "
        "dirty page cache series.",
        "",
        md_table(header, rows),
        "",
    ]


def render_memory(docs: dict[str, dict[str, Any]]) -> list[str]:
    """The module's memory on each kernel's largest volume, per tracked TiB (runner.memory_lines)."""
    rows = []
    for kernel, doc in docs.items():
        sl = doc.get("benchmarks", {}).get("snapshot_latency", {}).get("results") or {}
        p = runner.largest_memory_point(sl)
        if p:
            rows.append([kernel, f"{p['size_mib'] // 1024} GiB", f"{p['memory_kib_snapshot']:.0f}",
                         f"{p['memory_kib_incremental']:.0f}", f"{p['memory_mib_per_tib_snapshot']:.1f}",
                         f"{p['memory_mib_per_tib_incremental']:.1f}"])  # fmt: skip
    if not rows:
        return []
    header = ["kernel", "volume", "snapshot KiB", "incremental KiB", "per TiB, snapshot MiB",
              "per TiB, incremental MiB"]  # fmt: skip
    return [
        "Module memory on the largest volume (its /proc/vmallocinfo allocations plus SUnreclaim, read "
        "before setup-snapshot and after each ioctl; a flat bitmap, one bit per 4 KiB block, would be "
        "32 MiB per TiB):",
        "",
        md_table(header, rows),
        "",
    ]


# ---------------------------------------------------------------- the page


def newest_with(docs: dict[str, dict[str, Any]], key: str) -> tuple[str, dict[str, Any]] | None:
    """The kernel and entry of the newest run that has results for a benchmark."""
    having = [
        (k, d["benchmarks"][key])
        for k, d in docs.items()
        if d.get("benchmarks", {}).get(key, {}).get("results")
    ]
    if not having:
        return None
    return max(having, key=lambda ke: str(ke[1].get("date", "")))


def machine_of(meta: dict[str, Any]) -> str:
    """The host a run measured on, as the results' meta (or a kept section's origin) records it."""
    if not meta.get("cpu_model"):
        return "not recorded"  # kept from a run older than the record of it
    return f"{meta.get('nproc', '?')} CPUs ({meta['cpu_model']}), host kernel {meta.get('host_kernel', '?')}"


def run_row(kernel: str, doc: dict[str, Any], doc_path: Path) -> list[str]:
    """One kernel's row of the runs table; a section kept from an earlier run (--only) gets its own
    start, machine and source, since that run may have been on another host."""
    meta = doc.get("meta", {})
    entries = doc.get("benchmarks", {})
    guest = runner.cow_results(doc) or entries.get("snapshot_latency", {}).get("results") or {}
    started, machines, sources = [], [], []
    for key, e in sorted(entries.items()):
        origin = e.get("kept_from") or meta
        started.append(f"{key}: {runner.section_started(e, origin)}")
        kept = f" ({key})" if "kept_from" in e else ""
        machines.append(machine_of(origin) + kept)
        sources.append(str(origin.get("git") or "not recorded") + kept)
    return [
        f"[{kernel}]({page_of(kernel, doc_path)})",
        str(guest.get("guest_kernel", "-")),
        str(guest.get("accel", "-")).split(",")[0].upper(),
        ", ".join(k + (" (**failed**)" if e.get("rc") else "") for k, e in sorted(entries.items())),
        "; ".join(started),
        "; ".join(dict.fromkeys(machines)),
        "; ".join(dict.fromkeys(sources)),
        ("yes" if meta.get("quick") else "no") + (f"; **{meta['note']}**" if meta.get("note") else ""),
    ]


def render_overview(docs: dict[str, dict[str, Any]], doc_path: Path, plot_dir: Path) -> None:
    """Write the overview page from every kernel's results (kernel target -> results document)."""
    md = [
        "# Benchmarks",
        "",
        "Generated by `benchmarks/run` from each kernel target's results (do not edit by hand; "
        "`benchmarks/run --kernel <target>` measures one kernel and renders this page again, "
        "`benchmarks/run --render-only` renders every page from the results files kept beside them). "
        "Every ratio is from one run on one kernel, tracked and untracked runs paired in the same "
        "guest; the host is shared and TCG speed follows its load, so compare ratios, not MiB/s, "
        "across kernels (and runs may come from different machines: see the runs table). Nothing here "
        "is asserted.",
        "",
    ]
    if not docs:
        md += ["No results yet: run `benchmarks/run`.", ""]
    else:
        header = ["kernel target (its page)", "guest kernel", "accelerator", "benchmarks", "started",
                  "machine", "source", "quick; conditions"]  # fmt: skip
        md += ["Runs:", "", md_table(header, [run_row(k, d, doc_path) for k, d in docs.items()]), ""]
        failed = [
            f"- {k}, {name}: {e.get('error') or 'exit status ' + str(e.get('rc'))}"
            for k, d in docs.items()
            for name, e in sorted(d.get("benchmarks", {}).items())
            if e.get("rc")
        ]
        md += ["Failed:", "", *failed, ""] if failed else []
    cows = {k: c for k, d in docs.items() if (c := runner.cow_results(d)) and measured_targets(c)}
    if cows:
        md += render_write_overhead(cows, doc_path, plot_dir)
        missing = ", ".join(k for k in docs if k not in cows)
        md += [f"Write overhead not measured on: {missing} (see Failed above).", ""] if missing else []
    md += render_latency(docs)
    md += render_memory(docs)
    rc = newest_with(docs, "round_cost")
    if rc:
        md += [
            *runner.render_round_cost(rc[1]["results"])[:-1],
            "",
            f"(From the {rc[0]} run of {rc[1]['date']}.)",
            "",
        ]
    ui = newest_with(docs, "update_img")
    if ui:
        md += [
            *runner.render_update_img(ui[1]["results"])[:-1],
            "",
            f"(From the {ui[0]} run of {ui[1]['date']}.)",
            "",
        ]
    gb = newest_with(docs, "guest_boot")
    if gb:
        md += [*runner.render_boot(gb[1]["results"]), f"(From the {gb[0]} run of {gb[1]['date']}.)", ""]
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text("\n".join(md).rstrip() + "\n")
