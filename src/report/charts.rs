//! The report's charts, drawn with `plotters` (SVG backend only: no fonts are
//! rasterised, text is SVG `<text>` the browser renders with its own fonts).
//!
//! Rules: every function returns one self-contained `<svg>` element as a
//! string; text passed in (stage names, feature names) is escaped by
//! plotters' SVG backend; nothing refers to an external resource.

use super::StatusColors;
use crate::engine::runs::Status;
use crate::model::evaluation::CalibrationBin;
use anyhow::{Result, anyhow};
use plotters::prelude::*;

const FONT: &str = "sans-serif";
const BLUE: RGBColor = RGBColor(0x1f, 0x6f, 0xb5);
const GREY: RGBColor = RGBColor(0x88, 0x88, 0x88);

fn e<E: std::fmt::Debug>(err: E) -> anyhow::Error {
    anyhow!("drawing a chart: {err:?}")
}

/// The ROC curve with the chance diagonal.
pub fn roc(points: &[[f64; 2]], auc: f64) -> Result<String> {
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (320, 300)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("ROC (test AUC {auc:.4})"), (FONT, 15))
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(40)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(e)?;
        chart.configure_mesh().x_desc("false positive rate").y_desc("true positive rate").x_labels(6).y_labels(6).draw().map_err(e)?;
        chart.draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], GREY.stroke_width(1))).map_err(e)?;
        chart.draw_series(LineSeries::new(points.iter().map(|p| (p[0], p[1])), BLUE.stroke_width(2))).map_err(e)?;
        root.present().map_err(e)?;
    }
    Ok(buf)
}

/// Observed fraction of positives against mean predicted probability per
/// bin (empty bins left out), with the perfectly calibrated diagonal.
pub fn calibration(bins: &[CalibrationBin]) -> Result<String> {
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (320, 300)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Calibration (10 bins)", (FONT, 15))
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(40)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(e)?;
        chart.configure_mesh().x_desc("mean predicted probability").y_desc("fraction converted").x_labels(6).y_labels(6).draw().map_err(e)?;
        chart.draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], GREY.stroke_width(1))).map_err(e)?;
        let pts: Vec<(f64, f64)> = bins.iter().filter_map(|b| Some((b.mean_predicted?, b.fraction_positive?))).collect();
        chart.draw_series(LineSeries::new(pts.clone(), BLUE.stroke_width(2))).map_err(e)?;
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, BLUE.filled()))).map_err(e)?;
        root.present().map_err(e)?;
    }
    Ok(buf)
}

/// Horizontal bars of standardized coefficients (positive blue, negative red).
pub fn coefficients(names: &[String], values: &[f64]) -> Result<String> {
    let n = names.len().max(1);
    let m = values.iter().fold(0.0f64, |a, v| a.max(v.abs())).max(1e-9) * 1.1;
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (420, 60 + 34 * n as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Standardized coefficients", (FONT, 15))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(150)
            .build_cartesian_2d(-m..m, -0.5f64..(n as f64 - 0.5))
            .map_err(e)?;
        let label = |v: &f64| {
            let r = v.round();
            if (v - r).abs() < 1e-6 && r >= 0.0 && (r as usize) < names.len() { names[names.len() - 1 - r as usize].clone() } else { String::new() }
        };
        chart.configure_mesh().disable_y_mesh().y_labels(2 * n + 1).y_label_formatter(&label).x_labels(5).draw().map_err(e)?;
        let red = RGBColor(0xc0, 0x39, 0x2b);
        chart
            .draw_series(values.iter().enumerate().map(|(i, &v)| {
                let y = (names.len() - 1 - i) as f64;
                Rectangle::new([(0.0, y - 0.35), (v, y + 0.35)], if v >= 0.0 { BLUE.filled() } else { red.filled() })
            }))
            .map_err(e)?;
        root.present().map_err(e)?;
    }
    Ok(buf)
}

/// One bar of the timeline.
pub struct Bar {
    pub stage: String,
    pub status: Status,
    pub worker: u32,
    pub start: f64,
    pub end: f64,
}

/// Stage start/end per scheduler slot (Gantt), coloured by status.
pub fn gantt(bars: &[Bar], workers: u32, total: f64, colors: &StatusColors) -> Result<String> {
    let workers = workers.max(1);
    let total = total.max(bars.iter().map(|b| b.end).fold(0.0, f64::max)).max(1e-3);
    let min_w = total / 400.0;
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (960, 90 + 44 * workers)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..total * 1.01, -0.5f64..(workers as f64 - 0.5))
            .map_err(e)?;
        let label = |v: &f64| {
            let r = v.round();
            if (v - r).abs() < 1e-6 && r >= 0.0 && r < workers as f64 { format!("worker {}", r as u32) } else { String::new() }
        };
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(2 * workers as usize + 1)
            .y_label_formatter(&label)
            .light_line_style(WHITE)
            .x_desc("seconds since the run started")
            .draw()
            .map_err(e)?;
        chart
            .draw_series(bars.iter().map(|b| {
                let y = b.worker as f64;
                let c = colors.of(b.status);
                Rectangle::new([(b.start, y - 0.38), (b.end.max(b.start + min_w), y + 0.38)], c.filled())
            }))
            .map_err(e)?;
        chart
            .draw_series(bars.iter().map(|b| {
                let y = b.worker as f64;
                Rectangle::new([(b.start, y - 0.38), (b.end.max(b.start + min_w), y + 0.38)], WHITE.stroke_width(1))
            }))
            .map_err(e)?;
        // Names inside the bars wide enough to hold them.
        let mut labels = Vec::new();
        for b in bars {
            let (x0, _) = chart.backend_coord(&(b.start, 0.0));
            let (x1, _) = chart.backend_coord(&(b.end, 0.0));
            if (x1 - x0) as f64 > 7.0 * b.stage.chars().count() as f64 + 8.0 {
                labels.push(Text::new(b.stage.clone(), (b.start + (b.end - b.start) * 0.02, b.worker as f64 + 0.12), (FONT, 12).into_font().color(&WHITE)));
            }
        }
        chart.draw_series(labels).map_err(e)?;
        root.present().map_err(e)?;
    }
    Ok(buf)
}

/// A node of the built-in DAG layout, in pixels.
pub struct NodeBox {
    pub label: String,
    pub status: Option<Status>,
    pub x: i32,
    pub y: i32,
    pub w: i32,
    pub h: i32,
}

/// The DAG drawn from a finished layout (boxes + edges as index pairs).
pub fn dag(nodes: &[NodeBox], edges: &[(usize, usize)], width: u32, height: u32, colors: &StatusColors) -> Result<String> {
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (width.max(100), height.max(60))).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let edge_style = RGBColor(0x55, 0x55, 0x55).stroke_width(1);
        for &(a, b) in edges {
            let (na, nb) = (&nodes[a], &nodes[b]);
            let from = (na.x + na.w, na.y + na.h / 2);
            let to = (nb.x, nb.y + nb.h / 2);
            let mid = (from.0 + to.0) / 2;
            root.draw(&PathElement::new(vec![from, (mid, from.1), (mid, to.1), to], edge_style)).map_err(e)?;
            root.draw(&Polygon::new(vec![to, (to.0 - 7, to.1 - 4), (to.0 - 7, to.1 + 4)], RGBColor(0x55, 0x55, 0x55).filled())).map_err(e)?;
        }
        for n in nodes {
            let fill = n.status.map(|s| colors.of(s)).unwrap_or(WHITE);
            root.draw(&Rectangle::new([(n.x, n.y), (n.x + n.w, n.y + n.h)], fill.filled())).map_err(e)?;
            root.draw(&Rectangle::new([(n.x, n.y), (n.x + n.w, n.y + n.h)], BLACK.stroke_width(1))).map_err(e)?;
            let text_color = if n.status.is_some() { WHITE } else { BLACK };
            root.draw(&Text::new(n.label.clone(), (n.x + 8, n.y + n.h / 2 - 7), (FONT, 13).into_font().color(&text_color))).map_err(e)?;
        }
        root.present().map_err(e)?;
    }
    Ok(buf)
}
