"""Run an experiment campaign (configs/campaign/<name>.yaml): every entry (models x seeds, each
ablation) is trained and then evaluated with the campaign's evaluation pack; finished stages are
recorded under reports/<name>/ and never run again, so the command can be killed at any point
and rerun to continue.

    python scripts/run_campaign.py --campaign cpu             # run everything left, here
    python scripts/run_campaign.py --campaign cpu --status    # done, running, left, time estimates
    python scripts/run_campaign.py --campaign cpu --plan      # entries, parameter counts, commands
    python scripts/run_campaign.py --campaign pilot           # prints the torchrun commands
    python scripts/run_campaign.py --campaign pilot --launch  # ... and runs them here, in order

Checkpoints and full result files go to runs/campaign-<name>/<entry>/; the small files the
reports are made from (train.json, each result without its per-item records, plots) to
reports/<name>/<entry>/, which is committed as entries finish."""

from __future__ import annotations

import argparse
import statistics
import sys

from nested_learning.campaign.runner import Runner, print_commands, render_status
from nested_learning.campaign.spec import Campaign, CampaignError
from nested_learning.cli._common import command


def plan(c: Campaign) -> str:
    lines = [f"campaign {c.name} ({c.path})", c.scale, ""]
    rows, main = [], {}
    for e in c.entries():
        if e.seed != (c.seeds[0] if e.group == "main" else c.ablation_seeds[0]):
            continue
        total, ne = c.parameters(e)
        if e.group == "main":
            main[e.model] = total
        rows.append((e, total, ne))
    ref = statistics.fmean(main.values())
    lines += ["| entry | group | parameters | non-embedding | vs the main models' mean |", "|---|---|---|---|---|"]
    for e, total, ne in rows:
        lines.append(f"| {e.variant} | {e.group} | {total:,} | {ne:,} | {100 * (total / ref - 1):+.1f}% |")
    spread = 100 * (max(main.values()) - min(main.values())) / min(main.values())
    lines += ["", f"main models within {spread:.1f}% of each other in parameters "
              + ("(matched: within 5%)" if spread <= 5 else "(NOT matched: more than 5% apart)"),
              f"entries: {len(c.main_entries())} main ({len(c.models)} models x seeds {c.seeds}), "
              f"{len(c.experiments) * len(c.ablation_seeds)} ablation ({len(c.experiments)} x seeds "
              f"{c.ablation_seeds})" + (f", plus seeds {c.confirm_seeds} of each ablation whose effect is within "
                                         f"{c.confirm_sigmas:g} seed standard deviations of {c.reference}"
                                         if c.confirm_seeds else " (no confirmation seeds)"),
              f"stages per entry: {', '.join(c.stages)}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--campaign", required=True, help="a name in configs/campaign/ or a YAML file")
    ap.add_argument("--status", action="store_true", help="print what is done, running and left, and stop")
    ap.add_argument("--plan", action="store_true", help="print the entries with their parameter counts, and stop")
    ap.add_argument("--print", dest="print_only", action="store_true", help="print every entry's commands, and stop")
    ap.add_argument("--recollect", action="store_true",
                    help="collect every finished stage into reports/ again from its run folder, and stop")
    ap.add_argument("--launch", action="store_true", help="run a campaign whose file says execute: false")
    ap.add_argument("--only", default=None, help="comma-separated entry names to run (default: all)")
    ap.add_argument("--runs-dir", default=None, help="where runs/campaign-<name>/ goes (default: runs/)")
    ap.add_argument("--reports-dir", default=None, help="where reports/<name>/ goes (default: reports/)")
    ap.add_argument("--max-entries", type=int, default=None, help="stop after this many entries")
    a = ap.parse_args(argv)
    c = Campaign.load(a.campaign, runs_root=a.runs_dir, reports_root=a.reports_dir)  # a CampaignError (ValueError) is said in one line
    runner = Runner(c)
    if a.status:
        print(render_status(runner))
        return 0
    if a.recollect:
        redone = runner.recollect()
        print(f"collected again: {len(redone)} stage(s)" + (f" ({', '.join(redone)})" if redone else ""))
        return 0
    if a.plan:
        print(plan(c))
        return 0
    if a.print_only or not (c.execute or a.launch):
        if not c.execute:
            print(f"# campaign {c.name}: {c.scale}\n# these commands run on the cluster; "
                  "--launch runs them here, in order", flush=True)
        print_commands(c, runner.entries())
        return 0
    only = [x for x in a.only.split(",") if x] if a.only else None
    if only:
        names = {e.name for e in runner.entries()}
        bad = [x for x in only if x not in names]
        if bad:
            raise CampaignError(f"--only: no entry {', '.join(bad)}; the entries are {', '.join(sorted(names))}")
    rc = runner.run(only=only, max_entries=a.max_entries)
    if rc and rc < 128:
        print(f"{rc} stage(s) failed: rerun to retry them; their logs are named above", file=sys.stderr)
        raise SystemExit(1)
    if rc:
        raise SystemExit(rc)  # stopped by a signal: 130 (SIGINT) or 143 (SIGTERM)
    return 0


console = command(main)


if __name__ == "__main__":
    console()
