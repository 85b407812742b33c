"""Soak report: the summary of a soak run, its pass/fail checks, and its markdown tables."""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

from benchmarks import report
from benchmarks.soak_checks import check_record
from benchmarks.soak_faults import Soak

# ---------------------------------------------------------------------------------------------------------------
# Summary and report


def _spread(values: Sequence[float]) -> dict[str, float | None]:
    return {"min": min(values) if values else None, "median": statistics.median(values) if values else None,
            "max": max(values) if values else None}


def summarize(soak: Soak, load_s: float, status: dict[str, Any]) -> dict[str, Any]:
    records = soak.records
    outcomes = Counter(r.outcome for r in records)
    defects = [d for r in records if (d := check_record(r, soak.references[r.prompt_index]))]
    hangs = [{"prompt_index": r.prompt_index, "max_tokens": r.max_tokens, "abort_after_tokens": r.abort_after_tokens,
              "started_at_s": r.start_s - soak.start_s, "error": r.error} for r in records if r.outcome == "hang"]
    tokens_ok = sum(len(r.tokens) for r in records if r.outcome == "ok")
    tokens_all = sum(len(r.tokens) for r in records)
    back = [k.back_to_serving_s for k in soak.kills if k.back_to_serving_s is not None]
    last = status["last"]
    leaked = {name: last.get(name) for name in ("num_used_blocks", "num_requests_running", "num_requests_waiting",
                                                  "num_requests_swapped")}
    kill_times = [k.at_s for k in soak.kills]
    outages = [(at - soak.start_s, state) for at, state in soak.monitor.changes if state != "SERVING"
               and at >= soak.start_s and not any(0 <= at - soak.start_s - t <= soak.args.recovery_timeout_s
                                                   for t in kill_times)]
    checks = {
        "hangs": (len(hangs), 0),
        "lost_or_duplicated": (len(defects), 0),
        "leaked_used_blocks": (leaked["num_used_blocks"], 0),
        "leaked_running": (leaked["num_requests_running"], 0),
        "leaked_waiting": (leaked["num_requests_waiting"], 0),
        "failed_otherwise": (outcomes["failed"], 0),
        "kills_not_recovered": (sum(not k.recovered for k in soak.kills), 0),
    }
    return {
        "load_s": load_s,
        "requests": {"total": len(records), "ok": outcomes["ok"], "aborted": outcomes["aborted"],
                     "unavailable": outcomes["unavailable"], "failed_otherwise": outcomes["failed"],
                     "hangs": outcomes["hang"]},
        "requests_by_kind": {kind: dict(Counter(r.outcome for r in records if r.kind == kind))
                             for kind in soak.args.kinds},
        "tokens": {"ok": tokens_ok, "all": tokens_all, "ok_per_s": tokens_ok / load_s,
                   "all_per_s": tokens_all / load_s},
        "defects": {"count": len(defects), "examples": defects[:20],
                    "by_kind": dict(Counter(f"{d['outcome']}:{d['token_problem'] or 'stream'}" for d in defects))},
        "hangs": hangs[:50],
        "errors": {outcome: dict(Counter(r.error for r in records if r.outcome == outcome).most_common(20))
                   for outcome in ("unavailable", "failed")},
        "status_after_load": status,
        "leaked": leaked,
        "kills": [dataclasses.asdict(k) for k in soak.kills],
        "back_to_serving_s": _spread(back),
        "health": {"num_polls": soak.monitor.num_polls, "outages_without_a_kill": outages[:20],
                   "changes": [(round(at - soak.start_s, 3), state) for at, state in soak.monitor.changes][:400]},
        "checks": {name: {"measured": measured, "target": target, "passed": measured == target}
                   for name, (measured, target) in checks.items()},
        "passed": all(measured == target for measured, target in checks.values()),
    }


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    summary, config = result["summary"], result["config"]
    checks = [[name, check["measured"], check["target"], "yes" if check["passed"] else "**NO**"]
              for name, check in summary["checks"].items()]
    back = summary["back_to_serving_s"]
    req, tok = summary["requests"], summary["tokens"]
    counts = [[req["total"], req["ok"], req["aborted"], req["unavailable"], req["failed_otherwise"], req["hangs"],
               f"{tok['all_per_s']:.1f}", f"{tok['ok_per_s']:.1f}"]]
    by_kind = [[kind, sum(outcomes.values()), *(outcomes.get(o, 0) for o in ("ok", "aborted", "unavailable", "failed",
                                                                             "hang"))]
               for kind, outcomes in summary["requests_by_kind"].items()]
    kills = [[k["index"], _num(k["at_s"], 1), k["killed_pid"], _num(k["not_serving_after_s"]),
              _num(k["back_to_serving_s"]), _num(k["worker_restarted_after_s"]), k["restart_delay_s"],
              k["new_pids"], "yes" if k["recovered"] else f"**NO** {k['note']}"] for k in summary["kills"]]
    workload = (f"`pagedserve serve` on {result['model']} (`{config['serve_command']}`), "
                f"{config['duration_s']:.0f} s of load at concurrency {config['concurrency']}: greedy streaming "
                f"Generate (ignore_eos; kinds {', '.join(config['kinds'])}, taking the prompts in turn) of "
                f"{config['num_distinct_prompts']} distinct random prompts of "
                f"{config['prompt_len'][0]}-{config['prompt_len'][1]} tokens, max_tokens "
                f"{config['max_tokens'][0]}-{config['max_tokens'][1]}, {config['abort_fraction']:.0%} cancelled at a "
                f"random point; the worker SIGKILLed every {config['kill_every_s']:.0f} s. Each finished request is "
                f"checked against its prompt's reference, computed one request at a time on the quiet server "
                f"first. Request deadline {config['request_deadline_s']:.0f} s. Serve exit code on SIGTERM after "
                f"the run: {result['serve_exit_code']}; worker processes left behind: {result['orphans']}. "
                f"Checkout when serve started: the commit above plus {len(config['modified_files_at_start'] or [])} "
                f"modified tracked files (listed in the JSON); HEAD at the end: {config['commit_at_end'][:12]}.\n")
    sections = [
        ("Workload", workload),
        ("Targets", report.markdown_table(("check", "measured", "target", "passed"), checks)),
        ("Requests", report.markdown_table(("requests", "ok", "aborted by us", "UNAVAILABLE", "failed otherwise",
                                            "hangs", "tokens/s (all)", "tokens/s (ok)"), counts)
         + "\n" + report.markdown_table(("kind", "requests", "ok", "aborted by us", "UNAVAILABLE", "failed otherwise",
                                         "hangs"), by_kind)),
        ("Kills", report.markdown_table(("kill", "at s", "pid", "NOT_SERVING after s", "SERVING after s",
                                         "worker_restarted after s", "serve backoff s", "new pid", "recovered"),
                                        kills)
         + f"\nTime back to SERVING: min {_num(back['min'])} s, median {_num(back['median'])} s, "
           f"max {_num(back['max'])} s.\n"),
    ]
    if summary["defects"]["count"] or summary["hangs"] or summary["errors"]["failed"]:
        details = json.dumps({"defects": summary["defects"]["examples"][:5], "hangs": summary["hangs"][:10],
                              "failed_otherwise": summary["errors"]["failed"]}, indent=1)
        sections.append(("Failures", f"```json\n{details}\n```\n"))
    title = f"Soak test: {result['model']} ({'passed' if summary['passed'] else 'FAILED'})"
    return report.markdown_report(title, result["metadata"], sections)
