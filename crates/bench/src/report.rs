//! BENCHMARKS.md, rendered from one run's figures: the machine and command, one table per job
//! kind with both workers and the ratios, the queue's ceiling, cold start, embeddings, the
//! targets with the measured figure beside each, then the hand-written analysis
//! (`bench/analysis.md`, which explains the figures and does not repeat them).

use std::fmt::Write as _;

use super::ceiling::JOBS_PER_LOOP;
use super::cold_start::ColdStart;
use super::embeddings::{EmbedFigures, Embeddings, TEXTS_PER_CLIENT};
use super::stats::{ratio, Spread};
use super::workers::{Figures, Row, REPS};

/// Everything one `bench compare` run measured.
#[derive(Debug, Clone, Default)]
pub struct Results {
    /// The machine, in words.
    pub machine: String,
    /// The command that produced this.
    pub command: String,
    /// When it ran (UTC) and how long it took, in words.
    pub when: String,
    /// The side-by-side rows (part 1).
    pub rows: Vec<Row>,
    /// The bare queue's echo jobs/s per concurrency (part 4).
    pub ceiling: Vec<(usize, Spread)>,
    /// Cold starts: ours, the SDK's (part 2).
    pub cold: Option<[ColdStart; 2]>,
    /// `runpod-worker --version` (the binary that maps no libtorch), ms.
    pub load_floor_ms: Option<Spread>,
    /// `runpod-worker-torch --version`: loading libtorch's CPU library and the binary, ms.
    pub torch_floor_ms: Option<Spread>,
    /// `runpod-worker mock-queue` from spawn to listening, ms.
    pub mock_listen_ms: Option<Spread>,
    /// The embedding comparison (part 3).
    pub embeddings: Option<Embeddings>,
    /// Batching on against off, in process (part 5): [`super::batching::run`]'s table.
    pub batching: Option<String>,
    /// Parts that failed, with why.
    pub failures: Vec<String>,
    /// The plot's path relative to BENCHMARKS.md.
    pub plot: String,
    /// The hand-written analysis appended at the end.
    pub analysis: String,
    /// Part 6: the fast path against the baseline build (a markdown table).
    pub fast_path: Option<String>,
    /// Part 7: embeddings through a load-balancing worker against the queue (a markdown table).
    pub load_balancing: Option<String>,
}

/// "median (min–max)" with `digits` decimals.
pub fn spread(s: &Spread, digits: usize) -> String {
    format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = digits)
}

/// A ratio as "1.23×", or "n/a".
pub fn times(r: f64) -> String {
    if r.is_finite() {
        if r >= 100.0 {
            format!("{r:.0}×")
        } else {
            format!("{r:.2}×")
        }
    } else {
        "n/a".into()
    }
}

fn digits(value: f64) -> usize {
    match value {
        v if v >= 100.0 => 0,
        v if v >= 10.0 => 1,
        _ => 2,
    }
}

fn s(spread_of: &Spread) -> String {
    spread(spread_of, digits(spread_of.median))
}

/// The table of one job kind.
pub fn kind_table(rows: &[&Row]) -> String {
    let mut out = String::from(
        "| conc | jobs/s ours | jobs/s SDK | ours/SDK | slot util ours | slot util SDK | \
         p50 ms ours | p50 ms SDK | p99 ms ours | p99 ms SDK | p99 ours/SDK | offered jobs/s | \
         CPU ms/job ours | CPU ms/job SDK | ours/SDK | peak RSS MB ours | peak RSS MB SDK |\n",
    );
    out += &"|---".repeat(17);
    out += "|\n";
    for row in rows {
        let (o, t): (&Figures, &Figures) = (&row.ours, &row.sdk);
        let pct = |x: &Spread| {
            spread(
                &Spread {
                    min: x.min * 100.0,
                    median: x.median * 100.0,
                    max: x.max * 100.0,
                },
                0,
            ) + " %"
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | **{}** | {} | {} | {} | {} | {} | {} | **{}** | {:.2} | {} | {} | {} | {:.0} | {:.0} |",
            row.concurrency,
            s(&o.jobs_s),
            s(&t.jobs_s),
            times(ratio(o.jobs_s.median, t.jobs_s.median)),
            pct(&o.utilisation),
            pct(&t.utilisation),
            s(&o.p50_ms),
            s(&t.p50_ms),
            s(&o.p99_ms),
            s(&t.p99_ms),
            times(ratio(o.p99_ms.median, t.p99_ms.median)),
            o.offered_s,
            s(&o.cpu_ms),
            s(&t.cpu_ms),
            times(ratio(o.cpu_ms.median, t.cpu_ms.median)),
            o.peak_rss_mb,
            t.peak_rss_mb,
        );
    }
    out
}

/// One target line: what, the measured figure, met or missed (and by how much).
pub fn target(what: &str, figure: &str, met: bool, miss: &str) -> String {
    if met {
        format!("- **met** — {what}: {figure}\n")
    } else {
        format!("- **missed** — {what}: {figure}; {miss}\n")
    }
}

fn row<'a>(rows: &'a [Row], kind: &str, concurrency: usize) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.kind == kind && r.concurrency == concurrency)
}

/// The targets of issue 14 with the measured figures.
pub fn targets(results: &Results) -> String {
    let mut out = String::new();
    let rows = &results.rows;
    for c in [1, 4, 16] {
        if let Some(r) = row(rows, "sleep 200 ms", c) {
            let u = r.ours.utilisation.median * 100.0;
            out += &target(
                &format!("200 ms jobs, slot utilisation ≥ 95 % at concurrency {c}"),
                &format!("{u:.1} % (SDK {:.1} %)", r.sdk.utilisation.median * 100.0),
                u >= 95.0,
                &format!("short by {:.1} points", 95.0 - u),
            );
        }
    }
    if let (Some(r), Some((_, ceil))) = (
        row(rows, "echo", 16),
        results.ceiling.iter().find(|(c, _)| *c == 16),
    ) {
        let share = r.ours.jobs_s.median / ceil.median * 100.0;
        out += &target(
            "echo at concurrency 16, ≥ 80 % of the mock queue's own ceiling",
            &format!(
                "{:.0} of {:.0} jobs/s = {share:.0} %",
                r.ours.jobs_s.median, ceil.median
            ),
            share >= 80.0,
            &format!("short by {:.0} points", 80.0 - share),
        );
    }
    if let Some(r) = row(rows, "echo", 1) {
        let p99 = r.ours.p99_ms.median;
        out += &target(
            "echo per-job overhead under 1 ms p99 at concurrency 1 and low load",
            &format!(
                "p99 {p99:.2} ms submit to result (p50 {:.2} ms) at {:.1} jobs/s offered, HTTP round trips to the mock included",
                r.ours.p50_ms.median, r.ours.offered_s
            ),
            p99 < 1.0,
            &format!("over by {:.2} ms", p99 - 1.0),
        );
    }
    if let Some([ours, sdk]) = &results.cold {
        let first = ours.first_ms.max;
        out += &target(
            "cold start with MiniLM on the CPU under 0.5 s to the first result, first job included",
            &format!(
                "{} ms median, {first:.0} ms worst of {REPS} (SDK {:.0} ms median)",
                ours.first_ms.median.round(),
                sdk.first_ms.median
            ),
            first < 500.0,
            &format!("over by {:.0} ms (worst run)", first - 500.0),
        );
    }
    if let Some(floor) = &results.load_floor_ms {
        out += &target(
            "`runpod-worker --version` under 50 ms",
            &format!("{} ms", s(floor)),
            floor.max < 50.0,
            &format!("over by {:.0} ms (worst run)", floor.max - 50.0),
        );
    }
    if let Some(listen) = &results.mock_listen_ms {
        out += &target(
            "`mock-queue` listening under 100 ms",
            &format!("{} ms", s(listen)),
            listen.max < 100.0,
            &format!("over by {:.0} ms (worst run)", listen.max - 100.0),
        );
    }
    for kind in ["classify", "extract"] {
        let mut figures = Vec::new();
        let mut met = true;
        for c in [1, 4, 16] {
            if let Some(r) = row(rows, kind, c) {
                let tp = ratio(r.ours.jobs_s.median, r.sdk.jobs_s.median);
                let p99 = ratio(r.ours.p99_ms.median, r.sdk.p99_ms.median);
                met &= tp >= 1.0 && p99 <= 1.0;
                figures.push(format!("c={c}: {} jobs/s, p99 {}", times(tp), times(p99)));
            }
        }
        if !figures.is_empty() {
            out += &target(
                &format!("real model ({kind}): throughput ≥ the SDK worker's at every concurrency, p99 no worse"),
                &format!("ours/SDK {}", figures.join("; ")),
                met,
                "see the ratios above 1× for p99 or below 1× for throughput",
            );
        }
    }
    if let Some(e) = &results.embeddings {
        let mut figures = Vec::new();
        let mut met = true;
        for (c, ours, theirs) in e.rows.iter().filter(|(c, _, _)| *c >= 4) {
            if let Some(theirs) = theirs {
                let tp = ratio(ours.texts_s.median, theirs.texts_s.median);
                let p99 = ratio(ours.p99_ms.median, theirs.p99_ms.median);
                met &= tp >= 1.5 && p99 <= 1.0;
                figures.push(format!("c={c}: {} texts/s, p99 {}", times(tp), times(p99)));
            }
        }
        if !figures.is_empty() {
            out += &target(
                "embeddings: throughput ≥ 1.5× infinity-emb's at every concurrency ≥ 4, p99 no worse",
                &format!("ours/infinity {}", figures.join("; ")),
                met,
                "see the ratios below 1.5× for throughput or above 1× for p99",
            );
        }
        let single = e
            .rows
            .iter()
            .zip(&e.unbatched)
            .find(|((c, _, _), _)| *c == 1);
        if let Some(((_, batched, _), unbatched)) = single {
            let p50 = ratio(batched.p50_ms.median, unbatched.p50_ms.median);
            out += &target(
                "embeddings at concurrency 1: p50 batched no worse than unbatched",
                &format!(
                    "p50 {} ms batched, {} ms unbatched: {}",
                    s(&batched.p50_ms),
                    s(&unbatched.p50_ms),
                    times(p50)
                ),
                p50 <= 1.0,
                "batching costs the lone request",
            );
        }
    }
    out
}

/// The whole BENCHMARKS.md.
pub fn render(results: &Results) -> String {
    let mut out = String::from("# Benchmarks: runpod-worker against the official SDK worker\n\n");
    out += "Generated by `make bench` (`runpod-worker bench compare`); do not edit by hand — the \
            explanations come from `bench/analysis.md`.\n\n";
    let _ = writeln!(out, "- Machine: {}", results.machine);
    let _ = writeln!(out, "- Command: `{}`", results.command);
    let _ = writeln!(out, "- Run: {}", results.when);
    out += "- Workers: runpod-worker `serve` and the official SDK worker (PyPI `runpod==1.12.0`, \
            `bench/sdk_worker.py`: an async handler with a `concurrency_modifier`), one mock queue \
            (`runpod-worker mock-queue`, no rate limits), each worker on its own endpoint id, the \
            same job inputs. Both log at WARN.\n";
    let _ = writeln!(
        out,
        "- Each figure is the median (min–max) of {REPS} repetitions after a warm-up (two jobs per slot, excluded). \
         Throughput: the worker is paused (SIGSTOP), the queue loaded, the worker continued. Latency: \
         submit to result (`/runsync`, the harness's own clock) with jobs offered open-loop at half the \
         slower worker's median throughput. CPU time and peak RSS: /proc, the worker's whole process tree.\n"
    );
    for failure in &results.failures {
        let _ = writeln!(out, "> **Not measured:** {failure}\n");
    }
    let _ = writeln!(
        out,
        "![jobs/s and p99 against concurrency]({})\n",
        results.plot
    );
    out += "## Targets\n\n";
    out += &targets(results);
    out += "\n## Side by side, per job kind\n\n";
    let mut kinds: Vec<&str> = Vec::new();
    for row in &results.rows {
        if !kinds.contains(&row.kind) {
            kinds.push(row.kind);
        }
    }
    for kind in kinds {
        let rows: Vec<&Row> = results.rows.iter().filter(|r| r.kind == kind).collect();
        let first = rows[0];
        let _ = writeln!(
            out,
            "### {kind}\n\nJobs per throughput run: ours {} per slot, SDK {} per slot; {} per latency run.\n",
            first.ours.jobs / first.concurrency.max(1),
            first.sdk.jobs / first.concurrency.max(1),
            first.ours.latency_jobs,
        );
        out += &kind_table(&rows);
        out += "\n";
    }
    if !results.ceiling.is_empty() {
        out += "## The queue's own ceiling (echo)\n\n";
        let _ = writeln!(
            out,
            "A client with no worker logic takes (`job-take`, one job a request) and completes each job at once, \
             with N such loops, {JOBS_PER_LOOP} jobs per loop, from a pre-loaded queue.\n"
        );
        out += "| conc | mock alone jobs/s | runpod-worker echo jobs/s | share | SDK echo jobs/s | share |\n|---|---|---|---|---|---|\n";
        for (c, ceil) in &results.ceiling {
            if let Some(r) = row(&results.rows, "echo", *c) {
                let _ = writeln!(
                    out,
                    "| {c} | {} | {} | {:.0} % | {} | {:.1} % |",
                    s(ceil),
                    s(&r.ours.jobs_s),
                    r.ours.jobs_s.median / ceil.median * 100.0,
                    s(&r.sdk.jobs_s),
                    r.sdk.jobs_s.median / ceil.median * 100.0
                );
            }
        }
        out += "\n";
    }
    if let Some([ours, sdk]) = &results.cold {
        out += "## Cold start (real model)\n\n";
        out += "Process start to result, with one classify and one extract job already queued (the first \
                call of each input shape included), concurrency 4. Start-up as shipped: ours runs its \
                start-up checks and warm-up call before its first take; the SDK has no warm-up, and its \
                automatic system checks are skipped (`RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true`) because one of \
                them connects to 8.8.8.8:53 and exits the worker when that fails, as it does on this \
                offline machine. \"Warm\": the same two jobs again on the warm process.\n\n";
        out += "| worker | start → first result ms | start → both results ms | warm, both ms |\n|---|---|---|---|\n";
        for (name, c) in [("runpod-worker", ours), ("SDK worker", sdk)] {
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} |",
                s(&c.first_ms),
                s(&c.both_ms),
                s(&c.warm_ms)
            );
        }
        if let Some(floor) = &results.load_floor_ms {
            let _ = writeln!(
                out,
                "| `runpod-worker --version` (no libtorch) | {} | | |",
                s(floor)
            );
        }
        if let Some(floor) = &results.torch_floor_ms {
            let _ = writeln!(
                out,
                "| `runpod-worker-torch --version` (loading libtorch's CPU library: the floor of a model command) | {} | | |",
                s(floor)
            );
        }
        if let Some(listen) = &results.mock_listen_ms {
            let _ = writeln!(
                out,
                "| `runpod-worker mock-queue`, start to listening | {} | | |",
                s(listen)
            );
        }
        let _ = writeln!(
            out,
            "| ours/SDK | {} | {} | {} |\n",
            times(ratio(ours.first_ms.median, sdk.first_ms.median)),
            times(ratio(ours.both_ms.median, sdk.both_ms.median)),
            times(ratio(ours.warm_ms.median, sdk.warm_ms.median))
        );
    }
    if let Some(e) = &results.embeddings {
        out += "## Embeddings: `local` against infinity-emb\n\n";
        let _ = writeln!(
            out,
            "One text per request (OpenAI `/v1/embeddings`), N clients in a closed loop, {TEXTS_PER_CLIENT} texts per client per run. \
             Ours: `runpod-worker local` with the shipped runpod.toml. infinity-emb 0.0.78 (`.venv-infinity`, \
             `--engine torch --device cpu --no-bettertransformer`, its defaults otherwise: batch size 32), serving \
             all-MiniLM-L6-v2 from the same local directory. One server runs at a time.\n"
        );
        match (&e.infinity_error, e.min_cosine) {
            (Some(error), _) => {
                let _ = writeln!(out, "> **infinity-emb did not run:** {error}\n");
            }
            (None, Some(cos)) => {
                let _ = writeln!(
                    out,
                    "Same embeddings: lowest cosine between the two servers over 8 texts {cos:.6} ({}).\n",
                    if cos >= 0.9999 { "≥ 0.9999: pass" } else { "below 0.9999: FAIL" }
                );
            }
            _ => {}
        }
        out += "| conc | texts/s ours | texts/s infinity | ours/infinity | p50 ms ours | p50 ms infinity | p99 ms ours | p99 ms infinity | p99 ours/infinity |\n|---|---|---|---|---|---|---|---|---|\n";
        for (c, o, t) in &e.rows {
            let dash = || "–".to_owned();
            let _ = writeln!(
                out,
                "| {c} | {} | {} | **{}** | {} | {} | {} | {} | **{}** |",
                s(&o.texts_s),
                t.as_ref().map_or_else(dash, |t| s(&t.texts_s)),
                t.as_ref()
                    .map_or_else(dash, |t| times(ratio(o.texts_s.median, t.texts_s.median))),
                s(&o.p50_ms),
                t.as_ref().map_or_else(dash, |t| s(&t.p50_ms)),
                s(&o.p99_ms),
                t.as_ref().map_or_else(dash, |t| s(&t.p99_ms)),
                t.as_ref()
                    .map_or_else(dash, |t| times(ratio(o.p99_ms.median, t.p99_ms.median))),
            );
        }
        out += "\n";
        if !e.unbatched.is_empty() {
            out += "The same `local` with batching off (`[batching] max_batch_rows = 1`: each text its own \
                    forward pass, as before batching; the shipped runpod.toml otherwise):\n\n\
                    | conc | texts/s | vs batched | vs infinity | p50 ms | p99 ms | p99 vs batched | p99 vs infinity |\n\
                    |---|---|---|---|---|---|---|---|\n";
            for ((c, shipped, theirs), one) in e.rows.iter().zip(&e.unbatched) {
                let vs = |t: &Option<EmbedFigures>, pick: fn(&EmbedFigures) -> f64| {
                    t.as_ref()
                        .map_or_else(|| "–".to_owned(), |t| times(ratio(pick(one), pick(t))))
                };
                let _ = writeln!(
                    out,
                    "| {c} | {} | {} | {} | {} | {} | {} | {} |",
                    s(&one.texts_s),
                    times(ratio(one.texts_s.median, shipped.texts_s.median)),
                    vs(theirs, |f| f.texts_s.median),
                    s(&one.p50_ms),
                    s(&one.p99_ms),
                    times(ratio(one.p99_ms.median, shipped.p99_ms.median)),
                    vs(theirs, |f| f.p99_ms.median),
                );
            }
            out += "\n";
        }
    }
    if let Some(table) = &results.batching {
        out += "## Batching across jobs, in process

";
        out += "The worker's classify and OpenAI embeddings handlers called in process (no queue, no HTTP: \
                the model path alone), one distinct text per job, `runpod-worker bench batching`:\n\n```\n";
        out += table;
        out += "```\n\n";
    }
    if let Some(table) = &results.fast_path {
        out += "## The fast path, against the baseline build\n\n";
        out += "Echo jobs from a pre-loaded queue, this build and the baseline (`--baseline`, a \
                build of an earlier commit; `make bench` builds it) measured alternately in the \
                same run, and the bare queue's ceiling in the same run (`runpod-worker bench \
                fastpath`). Latency: `/runsync` round trips offered at a steady low rate to the \
                concurrency-16 workers. Targets: at 16, at least 80% of the queue's ceiling; at 1, \
                at least 2x the baseline with less CPU per job; p99 under 1 ms.\n\n";
        out += table;
        out += "\n";
    }
    if let Some(table) = &results.load_balancing {
        out += "## Load-balancing mode against the queue\n\n";
        out += "One text per `/v1/embeddings` request, closed-loop clients: through the queue \
                (`local`'s OpenAI route: queued, taken, run, posted back) and straight to a \
                `serve --load-balancing` worker, both on this machine with the shipped \
                `runpod.toml` (`runpod-worker bench load-balancing`).\n\n";
        out += table;
        out += "\n";
    }
    out += &results.analysis;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(v: f64) -> Spread {
        Spread {
            min: v,
            median: v,
            max: v,
        }
    }

    fn results() -> Results {
        let figures = |per_s: f64, util: f64, p99: f64| Figures {
            jobs: 16,
            jobs_s: flat(per_s),
            utilisation: flat(util),
            p99_ms: flat(p99),
            offered_s: 2.0,
            ..Figures::default()
        };
        Results {
            rows: vec![
                Row {
                    kind: "echo",
                    concurrency: 16,
                    ours: figures(4000.0, 0.1, 0.8),
                    sdk: figures(16.0, 0.0, 900.0),
                },
                Row {
                    kind: "echo",
                    concurrency: 1,
                    ours: figures(900.0, 0.1, 0.8),
                    sdk: figures(1.0, 0.0, 900.0),
                },
                Row {
                    kind: "sleep 200 ms",
                    concurrency: 4,
                    ours: figures(19.0, 0.97, 210.0),
                    sdk: figures(3.3, 0.17, 1100.0),
                },
            ],
            ceiling: vec![(16, flat(5000.0))],
            analysis: "## Why\n".into(),
            plot: "docs/bench.svg".into(),
            ..Results::default()
        }
    }

    #[test]
    fn spreads_and_ratios_are_formatted() {
        assert_eq!(
            spread(
                &Spread {
                    min: 1.0,
                    median: 2.0,
                    max: 3.5
                },
                1
            ),
            "2.0 (1.0–3.5)"
        );
        assert_eq!(times(1.234), "1.23×");
        assert_eq!(times(250.0), "250×");
        assert_eq!(times(f64::NAN), "n/a");
    }

    #[test]
    fn targets_say_met_or_missed_with_the_figure() {
        let text = targets(&results());
        assert!(
            text.contains(
                "**met** — 200 ms jobs, slot utilisation ≥ 95 % at concurrency 4: 97.0 %"
            ),
            "{text}"
        );
        assert!(text.contains("**met** — echo at concurrency 16, ≥ 80 % of the mock queue's own ceiling: 4000 of 5000 jobs/s = 80 %"), "{text}");
        assert!(
            text.contains("**met** — echo per-job overhead under 1 ms p99"),
            "{text}"
        );
        let mut slow = results();
        slow.rows[2].ours.utilisation = flat(0.9);
        assert!(targets(&slow).contains("**missed** — 200 ms jobs, slot utilisation ≥ 95 % at concurrency 4: 90.0 % (SDK 17.0 %); short by 5.0 points"));
    }

    #[test]
    fn the_report_has_a_table_per_kind_the_ceiling_and_the_analysis() {
        let text = render(&results());
        assert!(text.contains("### echo") && text.contains("### sleep 200 ms"));
        assert!(
            text.contains("| 16 | 4000 (4000–4000) | 16.0 (16.0–16.0) | **250×** |"),
            "{text}"
        );
        assert!(
            text.contains("| 16 | 5000 (5000–5000) | 4000 (4000–4000) | 80 % |"),
            "{text}"
        );
        assert!(text.contains("![jobs/s and p99 against concurrency](docs/bench.svg)"));
        assert!(text.ends_with("## Why\n"));
    }
}
