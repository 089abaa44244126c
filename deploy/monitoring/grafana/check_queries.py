#!/usr/bin/env python3
"""Runs every PromQL query of Trine's Grafana dashboards against a Prometheus.

    check_queries.py --prometheus http://127.0.0.1:9090 [--dashboards DIR] [--wait SECONDS]
    check_queries.py --list-metrics [--skip-event-only] [--dashboards DIR]

The first form walks every panel of every dashboard (panels nested in rows
included), takes each target's `expr`, substitutes the two dashboard
variables the queries may use ($region -> .*, $__rate_interval -> 1m), runs
it as an instant query and prints one line per query: ok, EMPTY (no series)
or ERROR (Prometheus refused it, or a variable other than those two is
left). It exits 1 if any query is EMPTY or ERROR, and lists them at the end
with dashboard, panel title and expression. With --wait it runs the whole
set again every 2 s until every query is ok or that many seconds have
passed, and prints the last round (for a cluster just started: the
recording rules of alerts.yml are evaluated every 30 s).

--list-metrics prints every trine_* metric name the dashboards use, one a
line, sorted and deduplicated, histogram series (_bucket, _sum, _count)
reduced to their base name, so a test can check that a node exports each.
Recording rules (trine:...) are not listed: alerts.yml defines them.
--skip-event-only leaves out the counters a node exports only once the
event they count has happened (see EVENT_ONLY); the dashboards show 0 for
those until then.

Standard library only (Python 3.8+).
"""

import argparse
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

SUBSTITUTIONS = (
    ("${__rate_interval}", "1m"),
    ("$__rate_interval", "1m"),
    ("${region}", ".*"),
    ("$region", ".*"),
)

# Metrics the node registers only when the event they count first happens
# (the `metrics` crate creates a series on its first update; the node starts
# its label-less counters at 0, but a labelled one has no series until a
# label value is seen). A healthy cluster that has served requests may not
# export them; the dashboards' queries fall back to 0 for them
# (`... or on() 0 * sum(trine_node_up)`).
EVENT_ONLY = frozenset(
    {
        "trine_gossip_messages_ignored_total",
        "trine_gossip_messages_invalid_total",
        "trine_placement_moves_total",
        "trine_raft_rpc_failures_total",
        "trine_raft_snapshots_total",
        "trine_stage_recovery_seconds",
        "trine_stage_rejected_total",
        "trine_stage_requests_total",
    }
)

METRIC_RE = re.compile(r"(?<![A-Za-z0-9_:])trine_[A-Za-z0-9_]+(?![A-Za-z0-9_:(])")
HISTOGRAM_SUFFIX_RE = re.compile(r"_(bucket|sum|count)$")
LEFTOVER_VAR_RE = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*|\[\[[A-Za-z_]")


def load_dashboards(directory):
    """(file name, dashboard dict) of every *.json in directory, sorted."""
    out = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            d = json.load(f)
        # An export wrapped for the API ({"dashboard": {...}}) works too.
        if "dashboard" in d and "panels" not in d:
            d = d["dashboard"]
        out.append((name, d))
    return out


def walk_panels(panels):
    """Every panel, rows' nested panels included (collapsed rows hold theirs)."""
    for p in panels or []:
        yield p
        yield from walk_panels(p.get("panels"))


def queries(dashboards):
    """(dashboard title, panel title, refId, expr) of every target with an expr."""
    for name, d in dashboards:
        title = d.get("title") or name
        for p in walk_panels(d.get("panels")):
            for t in p.get("targets") or []:
                expr = t.get("expr")
                if expr:
                    yield title, p.get("title", "(untitled)"), t.get("refId", "?"), expr


def substitute(expr):
    for var, value in SUBSTITUTIONS:
        expr = expr.replace(var, value)
    return expr


def metric_names(exprs):
    names = set()
    for e in exprs:
        for m in METRIC_RE.findall(e):
            names.add(HISTOGRAM_SUFFIX_RE.sub("", m))
    return sorted(names)


def instant_query(base, expr, timeout):
    url = base.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        # Prometheus answers 400/422 with a JSON error body.
        try:
            body = json.load(e)
        except ValueError:
            return "ERROR", f"HTTP {e.code}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        return "ERROR", f"cannot query {base}: {e}"
    if body.get("status") != "success":
        return "ERROR", f"{body.get('errorType', '')}: {body.get('error', body)}"
    data = body.get("data", {})
    kind, result = data.get("resultType"), data.get("result")
    if kind in ("scalar", "string"):
        return "ok", f"{kind} {result[1]}"
    if not result:
        return "EMPTY", "no series"
    values = [s.get("value", [None, None])[1] for s in result]
    nan = sum(1 for v in values if v in ("NaN", "+Inf", "-Inf"))
    note = f"{len(result)} series"
    if nan:
        note += f", {nan} NaN/Inf (no observations in the window)"
    return "ok", note


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prometheus", help="base URL, e.g. http://127.0.0.1:9090")
    ap.add_argument("--dashboards", default=os.path.join(here, "dashboards"),
                    help="directory of dashboard JSON files (default: %(default)s)")
    ap.add_argument("--list-metrics", action="store_true",
                    help="print the trine_* metrics the dashboards use and exit")
    ap.add_argument("--skip-event-only", action="store_true",
                    help="with --list-metrics: leave out metrics exported only after their first event")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per query (default: %(default)s)")
    ap.add_argument("--wait", type=float, default=0.0,
                    help="retry the whole set every 2 s until all are ok or this many seconds pass (default: 0)")
    args = ap.parse_args(argv)

    dashboards = load_dashboards(args.dashboards)
    if not dashboards:
        print(f"no dashboards (*.json) in {args.dashboards}", file=sys.stderr)
        return 1
    qs = list(queries(dashboards))

    if args.list_metrics:
        for m in metric_names(e for _, _, _, e in qs):
            if args.skip_event_only and m in EVENT_ONLY:
                continue
            print(m)
        return 0

    if not args.prometheus:
        ap.error("--prometheus is required (or --list-metrics)")

    deadline = time.monotonic() + args.wait
    started = time.monotonic()
    while True:
        results = []
        for dash, panel, ref, expr in qs:
            q = substitute(expr)
            left = LEFTOVER_VAR_RE.search(q)
            if left:
                status, note = "ERROR", f"variable {left.group(0)!r} left (only $region and $__rate_interval may be used)"
            else:
                status, note = instant_query(args.prometheus, q, args.timeout)
            results.append((status, dash, panel, ref, q, note))
        failures = [r for r in results if r[0] != "ok"]
        if not failures or time.monotonic() >= deadline:
            break
        time.sleep(2)
    for status, dash, panel, ref, q, note in results:
        print(f"{status:5}  {dash} / {panel} [{ref}]: {q}  ({note})")
    if args.wait:
        print(f"\n(last round after {time.monotonic() - started:.0f} s of --wait {args.wait:g})", end="")
    print(f"\n{len(qs) - len(failures)} of {len(qs)} queries ok in {len(dashboards)} dashboards")
    if failures:
        print(f"{len(failures)} failed:")
        for status, dash, panel, ref, q, note in failures:
            print(f"  {status} dashboard {dash!r}, panel {panel!r} [{ref}]: {q}  ({note})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
