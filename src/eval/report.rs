//! Rendering a divergence report: a Markdown table and an SVG plot (KL over position per method; bits per
//! layer over time for PM-KVQ).

use super::DivergenceReport;
use plotters::prelude::*;
use std::fmt::Write;
use std::path::Path;

fn mib(b: usize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

pub fn markdown(r: &DivergenceReport, title: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "### {title}\n");
    let _ = writeln!(
        s,
        "{} tokens, scored from token {}; fp16 cache: {:.2} MiB; compared with the {} cache\n",
        r.tokens,
        r.scored_from,
        mib(r.fp16_bytes),
        r.reference
    );
    let _ = writeln!(
        s,
        "| method | budget | mean KL | p99 KL | top-1 agree | flips (at near-ties) | ppl | peak true bytes | final bits/elem | in budget | greedy diverges at | note |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for m in &r.methods {
        let budget = m.budget.map_or("—".to_string(), |b| {
            format!("{:.2} MiB (1/{:.1})", mib(b), r.fp16_bytes as f64 / b as f64)
        });
        let _ = writeln!(
            s,
            "| {} | {budget} | {:.4} | {:.3} | {:.3} | {} ({}) | {:.3} | {:.2} MiB | {:.2} | {} | {} | {} |",
            m.method,
            m.mean_kl,
            m.p99_kl,
            m.top1_agreement,
            m.flips,
            m.near_tie_flips,
            m.ppl,
            mib(m.true_bytes),
            m.bits_per_element,
            if m.within_budget { "yes" } else { "**no**" },
            m.greedy_first_divergence.map_or("—".to_string(), |i| i.to_string()),
            m.stopped.as_deref().unwrap_or(""),
        );
    }
    s
}

const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Moving average over `w` positions (the per-token KL is too noisy to read).
fn smooth(v: &[f64], w: usize) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(v.len());
    let mut sum = 0.0;
    for (i, x) in v.iter().enumerate() {
        sum += x;
        if i >= w {
            sum -= v[i - w];
        }
        out.push((i as f64, sum / (i + 1).min(w) as f64));
    }
    out
}

pub fn plot_svg(r: &DivergenceReport, title: &str, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1000, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(440);
    let series: Vec<(String, Vec<(f64, f64)>)> = r
        .methods
        .iter()
        .filter(|m| m.method != r.reference)
        .map(|m| (m.method.clone(), smooth(&m.kl_trace, 64)))
        .collect();
    let xmax = series.iter().map(|s| s.1.len()).max().unwrap_or(1).max(1) as f64;
    let ymax = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(1e-3f64, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!("{title}: KL({} ‖ method), 64-token moving average", r.reference),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc(format!("scored position (from token {})", r.scored_from))
        .y_desc("KL (nats)")
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;

    // bits per layer over time for the adaptive method: min, mean and max over layers
    let pm = r.methods.iter().find(|m| !m.bits_trace.is_empty());
    let mut chart = ChartBuilder::on(&bottom)
        .caption(
            "PM-KVQ body bits per layer over time (min / mean / max over layers)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..r.tokens as f64, 0f64..17f64)?;
    chart.configure_mesh().x_desc("tokens stored").y_desc("bits").draw()?;
    if let Some(pm) = pm {
        // step functions: each value holds until the next change
        let mut trace = pm.bits_trace.clone();
        if let Some(last) = trace.last().cloned() {
            trace.push((r.tokens, last.1));
        }
        let stat = |f: &dyn Fn(&[u32]) -> f64| -> Vec<(f64, f64)> {
            let mut pts = Vec::new();
            for w in trace.windows(2) {
                let v = f(&w[0].1);
                pts.push((w[0].0 as f64, v));
                pts.push((w[1].0 as f64, v));
            }
            pts
        };
        let min = |b: &[u32]| b.iter().copied().min().unwrap_or(0) as f64;
        let max = |b: &[u32]| b.iter().copied().max().unwrap_or(0) as f64;
        let mean = |b: &[u32]| b.iter().map(|&x| x as f64).sum::<f64>() / b.len().max(1) as f64;
        for (i, (name, f)) in [("min", &min as &dyn Fn(&[u32]) -> f64), ("mean", &mean), ("max", &max)]
            .into_iter()
            .enumerate()
        {
            let c = COLORS[(i + 3) % COLORS.len()];
            chart
                .draw_series(LineSeries::new(stat(f), c.stroke_width(2)))?
                .label(format!("{} {name}", pm.method))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
