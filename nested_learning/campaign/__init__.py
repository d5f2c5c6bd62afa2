"""Experiment campaigns: their specification (spec), the resumable runner (runner), the result files kept for reports (collect) and the reports generated from them (report)."""
