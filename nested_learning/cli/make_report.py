"""Generate a campaign's reports from its result files: docs/experiments_report.md,
reports/ablations.md, docs/stage2_progress.md, the results section of docs/writeup.md and the figures in reports/<campaign>/figures/. Run it whenever entries
finish; it reads only reports/<campaign>/ (what the campaign runner collects and commits), so
the committed reports regenerate identically from the committed result files.

    python scripts/make_report.py --campaign cpu
    python scripts/make_report.py --campaign cpu --check   # exit 1 when the committed reports are stale"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from nested_learning.campaign.report import write_reports
from nested_learning.campaign.spec import Campaign
from nested_learning.cli._common import command


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--campaign", default="cpu", help="a name in configs/campaign/ or a YAML file (default: cpu)")
    ap.add_argument("--reports-dir", default=None, help="where reports/<name>/ is (default: reports/)")
    ap.add_argument("--experiments-md", default=None,
                    help="default: the campaign file's reports.experiments, else docs/experiments_report.md")
    ap.add_argument("--ablations-md", default=None,
                    help="default: the campaign file's reports.ablations, else reports/ablations.md")
    ap.add_argument("--progress-md", default=None,
                    help="default: the campaign file's reports.progress, else docs/stage2_progress.md")
    ap.add_argument("--writeup", default=None,
                    help="the document whose generated:headline section is filled (default: the campaign "
                         "file's reports.writeup, else docs/writeup.md)")
    ap.add_argument("--no-figures", action="store_true", help="the markdown only")
    ap.add_argument("--check", action="store_true",
                    help="regenerate the markdown into a temporary folder and exit 1 if it differs from the files")
    a = ap.parse_args(argv)
    c = Campaign.load(a.campaign, reports_root=a.reports_dir)
    exp = a.experiments_md or c.report_path("experiments")
    abl = a.ablations_md or c.report_path("ablations")
    prog = a.progress_md or c.report_path("progress")
    writeup = a.writeup or c.report_path("writeup")
    if a.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = write_reports(c, os.path.join(tmp, "e.md"), os.path.join(tmp, "a.md"), figures=False,
                                  progress_md=os.path.join(tmp, "p.md"), writeup_in=writeup,
                                  writeup_out=os.path.join(tmp, "w.md"))
            stale = []
            pairs = [(exp, fresh["e.md"]), (abl, fresh["a.md"]), (prog, fresh["p.md"])]
            pairs += [(writeup, fresh["w.md"])] if "w.md" in fresh else []
            for path, new in pairs:
                old = open(path).read() if os.path.exists(path) else None
                if old != open(new).read():
                    stale.append(path)
        if stale:
            print(f"stale: {', '.join(stale)} (regenerate with python scripts/make_report.py --campaign {c.name})",
                  file=sys.stderr)
            raise SystemExit(1)
        print("the reports match their result files")
        return {}
    out = write_reports(c, exp, abl, figures=not a.no_figures, progress_md=prog, writeup_in=writeup)
    for name, path in out.items():
        print(f"{name}: {path}")
    return out


console = command(main)


if __name__ == "__main__":
    console()
