//! A run's report: `report.json` (the outcome, for machines),
//! `history.json` (every operation and sample), `report.md` (for people)
//! and `timeline.svg` (faults, leader changes, request latency, errors).

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::Error;
use crate::run::Outcome;
use crate::workload::{History, OpKind};

pub fn write(dir: &Path, outcome: &Outcome, history: &History) -> Result<(), Error> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_vec_pretty(outcome).map_err(io)?,
    )?;
    std::fs::write(
        dir.join("history.json"),
        serde_json::to_vec(history).map_err(io)?,
    )?;
    std::fs::write(dir.join("report.md"), markdown(outcome, history))?;
    timeline(&dir.join("timeline.svg"), outcome, history)?;
    Ok(())
}

fn io(e: serde_json::Error) -> Error {
    Error::Io(std::io::Error::other(e))
}

fn secs(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), |v| format!("{v:.1}"))
}

pub fn markdown(o: &Outcome, h: &History) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Chaos run, seed {}: {}\n",
        o.seed,
        if o.passed { "PASSED" } else { "FAILED" }
    );
    let _ = writeln!(
        s,
        "{} nodes ({}), {} faults, {:.0} s, {} operations recorded. Replay: `trine chaos run {}` (the same schedule; timings on a live cluster vary).\n",
        o.nodes.len(),
        o.nodes.join(", "),
        o.faults.len(),
        o.duration_s,
        o.ops,
        o.schedule.replay
    );
    let _ = writeln!(s, "## Faults\n");
    let _ = writeln!(
        s,
        "| # | scenario | what | held s | new leader s | writable s | stages moved s | stages ready s | chains caught up after heal s | whole after heal s |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for r in &o.faults {
        let _ = writeln!(
            s,
            "| {} | {} ({}) | {} | {:.1} | {} | {} | {} | {} | {} | {} |",
            r.index + 1,
            r.fault.scenario.name(),
            r.fault.scenario.family(),
            r.description,
            (r.healed_ms - r.start_ms) / 1000.0,
            secs(r.new_leader_s),
            secs(r.writable_s),
            secs(r.moved_s),
            secs(r.stages_s),
            secs(r.converged_s),
            secs(r.whole_s),
        );
    }
    let _ = writeln!(
        s,
        "\nGoals: new leader < {:.0} s, writable < {:.0} s, stages moved elsewhere < {:.0} s (then ready once the model loads: the stages-ready column), chains caught up < {:.0} s after healing. Whole: every node up again (the leader marks a node up only after it has answered steadily for a while: damping), one leader, every stage ready. — means the measure does not apply (the fault did not touch the leader, or no stage sat on the faulted nodes).\n",
        crate::run::GOAL_NEW_LEADER_S,
        crate::run::GOAL_WRITABLE_S,
        crate::run::GOAL_STAGES_S,
        crate::run::GOAL_CONVERGED_S
    );
    let _ = writeln!(s, "## Checks\n");
    let _ = writeln!(s, "| check | verdict | evidence |");
    let _ = writeln!(s, "|---|---|---|");
    for c in &o.checks {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            c.name,
            if c.passed { "pass" } else { "**FAIL**" },
            c.detail.replace('|', "\\|")
        );
    }
    let mut by_kind: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for op in &h.ops {
        let e = by_kind.entry(format!("{:?}", op.kind)).or_default();
        e.0 += 1;
        if op.ok {
            e.1 += 1;
        }
    }
    let _ = writeln!(s, "\n## Workload\n");
    let _ = writeln!(s, "| operation | sent | succeeded |");
    let _ = writeln!(s, "|---|---|---|");
    for (k, (n, ok)) in by_kind {
        let _ = writeln!(s, "| {k} | {n} | {ok} |");
    }
    let _ = writeln!(
        s,
        "\nNot exercised by this run: a stage hand-off in the middle of a pipeline (the workload's model has single-stage replicas). The fenced-stage check above judges the node that finished each request against the placement of the time.\n\nFiles: `report.json`, `history.json` (every operation and sample), `timeline.svg`, `cluster/` (the nodes' data and logs)."
    );
    s
}

/// Three panels over the run's time: request latency (ok / failed), the
/// leader each node reports, and fault windows shaded on all.
pub fn timeline(path: &Path, o: &Outcome, h: &History) -> Result<(), Error> {
    let plot = |e: String| Error::Io(std::io::Error::other(e));
    let end = (o.duration_s * 1000.0).max(1.0) / 1000.0;
    let root = SVGBackend::new(path, (1200, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot(e.to_string()))?;
    let (top, bottom) = root.split_vertically(420);
    let max_latency = h
        .ops
        .iter()
        .map(|o| (o.end_ms - o.start_ms) / 1000.0)
        .fold(1.0f64, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!(
                "seed {}: request latency (green ok, red failed); faults shaded",
                o.seed
            ),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..end, 0f64..max_latency)
        .map_err(|e| plot(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .y_desc("latency s")
        .draw()
        .map_err(|e| plot(e.to_string()))?;
    for r in &o.faults {
        let x0 = r.start_ms / 1000.0;
        let x1 = r.healed_ms / 1000.0;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x0, 0.0), (x1, max_latency)],
                RGBColor(255, 200, 120).mix(0.35).filled(),
            )))
            .map_err(|e| plot(e.to_string()))?
            .label(r.fault.scenario.name());
    }
    let points = |ok: bool, kind: bool| {
        h.ops
            .iter()
            .filter(move |op| op.ok == ok && (op.kind == OpKind::Generate) == kind)
            .map(|op| (op.start_ms / 1000.0, (op.end_ms - op.start_ms) / 1000.0))
            .collect::<Vec<_>>()
    };
    for (ok, kind, color, size) in [
        (true, true, RGBColor(0, 150, 0), 3),
        (true, false, RGBColor(0, 90, 200), 2),
        (false, true, RGBColor(220, 0, 0), 4),
        (false, false, RGBColor(160, 0, 160), 4),
    ] {
        chart
            .draw_series(
                points(ok, kind)
                    .into_iter()
                    .map(|p| Circle::new(p, size, color.filled())),
            )
            .map_err(|e| plot(e.to_string()))?;
    }
    // Leader id per node over time.
    let max_id = h
        .status
        .iter()
        .map(|s| s.leader_id)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let mut leaders = ChartBuilder::on(&bottom)
        .caption(
            "leader id each node reports (0: none known)",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..end, 0f64..max_id + 1.0)
        .map_err(|e| plot(e.to_string()))?;
    leaders
        .configure_mesh()
        .x_desc("seconds since start")
        .y_desc("leader id")
        .draw()
        .map_err(|e| plot(e.to_string()))?;
    for r in &o.faults {
        leaders
            .draw_series(std::iter::once(Rectangle::new(
                [
                    (r.start_ms / 1000.0, 0.0),
                    (r.healed_ms / 1000.0, max_id + 1.0),
                ],
                RGBColor(255, 200, 120).mix(0.35).filled(),
            )))
            .map_err(|e| plot(e.to_string()))?;
    }
    for (i, node) in o.nodes.iter().enumerate() {
        let color = Palette99::pick(i);
        let series: Vec<(f64, f64)> = h
            .status
            .iter()
            .filter(|s| &s.node == node)
            .map(|s| {
                (
                    s.t_ms / 1000.0,
                    s.leader_id as f64 + (i as f64 - 3.0) * 0.03,
                )
            })
            .collect();
        leaders
            .draw_series(LineSeries::new(series, color.stroke_width(2)))
            .map_err(|e| plot(e.to_string()))?;
    }
    root.present().map_err(|e| plot(e.to_string()))?;
    Ok(())
}
