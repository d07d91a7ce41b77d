//! The report's SVG charts, drawn with plotters: grouped bars, one group per path.

use std::path::Path;

use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

use super::{Key, int, label};
use crate::suite::{Results, dataplane::PathKind, load::Protocol};

/// The chart files, by name.
pub struct Charts {
    pub throughput: String,
    pub latency: String,
    pub cpu: String,
    pub rss: String,
}

pub fn charts(results: &Results, dir: &Path) -> anyhow::Result<Charts> {
    let charts = Charts {
        throughput: "throughput.svg".into(),
        latency: "latency-p99.svg".into(),
        cpu: "cpu-per-1k.svg".into(),
        rss: "rss.svg".into(),
    };
    let groups: Vec<String> = results.paths.iter().map(|p| p.path.to_string()).collect();
    let series = |keys: &[(String, Key, Protocol)], scale: f64| -> Vec<(String, Vec<Option<f64>>)> {
        keys.iter()
            .map(|(name, key, protocol)| {
                (name.clone(), results.paths.iter().map(|p| key.value(p, *protocol).map(|v| v * scale)).collect())
            })
            .collect()
    };
    let per_protocol = |key: Key| Protocol::ALL.map(|p| (label(p).to_owned(), key, p)).to_vec();
    bar_chart(
        &dir.join(&charts.throughput),
        "Throughput (closed loop)",
        "requests per second",
        &groups,
        &series(&per_protocol(Key::Throughput), 1.0),
    )?;
    let latency: Vec<(String, Key, Protocol)> = Protocol::ALL
        .iter()
        .flat_map(|&p| {
            results.scenario.rates.iter().map(move |&r| (format!("{} @ {} rps", label(p), int(f64::from(r))), Key::P99(r), p))
        })
        .collect();
    bar_chart(
        &dir.join(&charts.latency),
        "p99 latency at fixed rates (open loop)",
        "milliseconds",
        &groups,
        &series(&latency, 1.0),
    )?;
    let proxied: Vec<String> = results.paths.iter().filter(|p| p.path != PathKind::Direct).map(|p| p.path.to_string()).collect();
    let without_direct = |all: Vec<(String, Vec<Option<f64>>)>| -> Vec<(String, Vec<Option<f64>>)> {
        let keep: Vec<bool> = results.paths.iter().map(|p| p.path != PathKind::Direct).collect();
        all.into_iter()
            .map(|(name, values)| (name, values.into_iter().zip(&keep).filter(|(_, k)| **k).map(|(v, _)| v).collect()))
            .collect()
    };
    bar_chart(
        &dir.join(&charts.cpu),
        "Proxy CPU per 1,000 requests at maximum throughput",
        "CPU milliseconds",
        &proxied,
        &without_direct(series(&per_protocol(Key::CpuAtMax), 1000.0)),
    )?;
    let rss =
        vec![("idle".to_owned(), Key::RssIdle, Protocol::Http1), ("under load (peak)".to_owned(), Key::RssLoad, Protocol::Http1)];
    bar_chart(
        &dir.join(&charts.rss),
        "Proxy RSS (all processes of the path)",
        "MB",
        &proxied,
        &without_direct(series(&rss, 1e-6)),
    )?;
    Ok(charts)
}

/// Grouped bars: one group per path, one bar per series, each labelled with its value.
fn bar_chart(
    file: &Path,
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[(String, Vec<Option<f64>>)],
) -> anyhow::Result<()> {
    let chart_error = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", file.display());
    // 140 px per group keeps the longest path names under the axis (`ferry-1hop-proxy`) apart;
    // six paths or fewer fit the usual 960 px.
    let width = (140 * groups.len() as u32 + 112).max(960);
    let root = SVGBackend::new(file, (width, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| chart_error(&e))?;
    let max = series.iter().flat_map(|(_, values)| values.iter().flatten()).fold(0.0_f64, |a, &b| a.max(b));
    let top = if max > 0.0 { max * 1.25 } else { 1.0 };
    let width = groups.len().max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..width, 0.0..top)
        .map_err(|e| chart_error(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .x_labels(0)
        .y_desc(y_label)
        .y_label_formatter(&|v| if top >= 100.0 { int(*v) } else { format!("{v:.2}") })
        .draw()
        .map_err(|e| chart_error(&e))?;
    let bars = series.len().max(1) as f64;
    let bar = 0.8 / bars;
    for (j, (name, values)) in series.iter().enumerate() {
        let color = Palette99::pick(j).to_rgba();
        let rects = values.iter().enumerate().filter_map(|(i, value)| {
            let x = i as f64 + 0.1 + j as f64 * bar;
            value.map(|v| Rectangle::new([(x, 0.0), (x + bar * 0.92, v)], color.filled()))
        });
        chart
            .draw_series(rects)
            .map_err(|e| chart_error(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], color.filled()));
        let labels = values.iter().enumerate().map(|(i, value)| {
            let x = i as f64 + 0.1 + (j as f64 + 0.46) * bar;
            let text = match value {
                Some(v) if *v >= 100.0 => int(*v),
                Some(v) => format!("{v:.2}"),
                None => "n/a".into(),
            };
            let y = value.unwrap_or(0.0) + top * 0.01;
            Text::new(text, (x, y), ("sans-serif", 11).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Bottom)))
        });
        chart.draw_series(labels).map_err(|e| chart_error(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| chart_error(&e))?;
    // Group names under the axis, centred on each group.
    let area = chart.plotting_area();
    for (i, group) in groups.iter().enumerate() {
        let (x, y) = area.map_coordinate(&(i as f64 + 0.5, 0.0));
        root.draw(&Text::new(
            group.as_str(),
            (x, y + 10),
            ("sans-serif", 15).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Top)),
        ))
        .map_err(|e| chart_error(&e))?;
    }
    root.present().map_err(|e| chart_error(&e))?;
    Ok(())
}
