//! The plot of BENCHMARKS.md (docs/bench.svg): jobs/s and p99 latency against concurrency, both
//! workers, one row per job kind, log scales (the workers differ by orders of magnitude). SVG
//! with plotters' built-in text estimate: no system fonts, no C libraries.

use anyhow::Result;
use plotters::prelude::*;

use super::stats::Spread;
use super::workers::Row;

/// Colours of the two workers and of the queue's ceiling.
const OURS: RGBColor = RGBColor(31, 119, 180);
const SDK: RGBColor = RGBColor(214, 39, 40);
const CEILING: RGBColor = RGBColor(120, 120, 120);

/// The series of one panel: (name, colour, points).
type Series = (&'static str, RGBColor, Vec<(f64, f64)>);

fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    caption: &str,
    y_desc: &str,
    series: &[Series],
) -> Result<()> {
    let values = series
        .iter()
        .flat_map(|(_, _, p)| p.iter().map(|(_, y)| *y));
    let (low, high) = values
        .filter(|y| *y > 0.0)
        .fold((f64::INFINITY, 0.0f64), |(l, h), y| (l.min(y), h.max(y)));
    let (low, high) = if low.is_finite() {
        (low / 2.0, high * 2.0)
    } else {
        (0.1, 10.0)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(56)
        .build_cartesian_2d((0.8f64..20.0f64).log_scale(), (low..high).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("concurrency")
        .y_desc(y_desc)
        .x_labels(4)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| {
            format!("{y:.3}")
                .trim_end_matches('0')
                .trim_end_matches('.')
                .to_owned()
        })
        .draw()?;
    for (name, colour, points) in series {
        let colour = *colour;
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                colour.stroke_width(2),
            ))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, colour.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// The SVG text of the plot; `ceiling` is the bare queue's jobs/s per concurrency (drawn on
/// the echo throughput panel).
pub fn render(rows: &[Row], ceiling: &[(usize, Spread)]) -> Result<String> {
    let mut kinds: Vec<&str> = Vec::new();
    for row in rows {
        if !kinds.contains(&row.kind) {
            kinds.push(row.kind);
        }
    }
    let mut svg = String::new();
    {
        let height = 300 * kinds.len().max(1) as u32;
        let root = SVGBackend::with_string(&mut svg, (960, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let areas = root.split_evenly((kinds.len().max(1), 2));
        for (i, kind) in kinds.iter().enumerate() {
            let of = |pick: fn(&Row) -> f64| -> Vec<(f64, f64)> {
                rows.iter()
                    .filter(|r| r.kind == *kind)
                    .map(|r| (r.concurrency as f64, pick(r)))
                    .collect()
            };
            let mut throughput = vec![
                ("runpod-worker", OURS, of(|r| r.ours.jobs_s.median)),
                ("SDK worker", SDK, of(|r| r.sdk.jobs_s.median)),
            ];
            if *kind == "echo" && !ceiling.is_empty() {
                let points = ceiling.iter().map(|(c, s)| (*c as f64, s.median)).collect();
                throughput.push(("mock queue alone", CEILING, points));
            }
            panel(
                &areas[2 * i],
                &format!("{kind}: jobs/s (pre-loaded queue)"),
                "jobs/s",
                &throughput,
            )?;
            let latency = [
                ("runpod-worker", OURS, of(|r| r.ours.p99_ms.median)),
                ("SDK worker", SDK, of(|r| r.sdk.p99_ms.median)),
            ];
            panel(
                &areas[2 * i + 1],
                &format!("{kind}: p99 ms at half load"),
                "p99 ms",
                &latency,
            )?;
        }
        root.present()?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::Figures;

    #[test]
    fn the_plot_is_an_svg_with_both_workers() {
        let figures = |per_s: f64| Figures {
            jobs_s: Spread {
                min: per_s,
                median: per_s,
                max: per_s,
            },
            p99_ms: Spread {
                min: 2.0,
                median: 2.0,
                max: 2.0,
            },
            ..Figures::default()
        };
        let rows: Vec<Row> = [1, 4, 16]
            .into_iter()
            .map(|c| Row {
                kind: "echo",
                concurrency: c,
                ours: figures(100.0 * c as f64),
                sdk: figures(c as f64),
            })
            .collect();
        let ceiling = vec![(
            16,
            Spread {
                min: 5000.0,
                median: 5000.0,
                max: 5000.0,
            },
        )];
        let svg = render(&rows, &ceiling).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..50]);
        assert!(
            svg.contains("runpod-worker")
                && svg.contains("SDK worker")
                && svg.contains("mock queue alone")
        );
    }
}
