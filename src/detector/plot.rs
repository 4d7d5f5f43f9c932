//! `eval --plot`: the ROC curve and the score histogram per label, as SVG
//! (drawn with `plotters`).

use std::path::Path;

use plotters::prelude::*;

use super::metrics::Scored;

/// Points of the ROC curve `(fpr, tpr)`, from (0, 0) to (1, 1), one per
/// distinct score (ties move both rates at once). Unscored rows are left out.
pub fn roc_points(rows: &[Scored]) -> Vec<(f64, f64)> {
    let mut s: Vec<(f64, bool)> = rows
        .iter()
        .filter_map(|r| r.score.map(|v| (v, r.malicious)))
        .collect();
    let pos = s.iter().filter(|(_, m)| *m).count().max(1) as f64;
    let neg = s.iter().filter(|(_, m)| !*m).count().max(1) as f64;
    s.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut out = vec![(0.0, 0.0)];
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut i = 0;
    while i < s.len() {
        let v = s[i].0;
        while i < s.len() && s[i].0.total_cmp(&v).is_eq() {
            if s[i].1 {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            i += 1;
        }
        out.push((fp / neg, tp / pos));
    }
    if out.last() != Some(&(1.0, 1.0)) {
        out.push((1.0, 1.0));
    }
    out
}

/// Writes a two-panel SVG: ROC curve (left) and the histogram of P(malicious)
/// per label in 20 bins with the threshold marked (right).
///
/// # Errors
/// Drawing or I/O errors, as text.
pub fn write_svg(path: &Path, rows: &[Scored], threshold: f64, title: &str) -> anyhow::Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("plot: {e}");
    let root = SVGBackend::new(path, (1100, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(520);

    let mut roc = ChartBuilder::on(&left)
        .caption(format!("ROC: {title}"), ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(44)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)
        .map_err(|e| err(&e))?;
    roc.configure_mesh()
        .x_desc("false-positive rate")
        .y_desc("recall (true-positive rate)")
        .draw()
        .map_err(|e| err(&e))?;
    roc.draw_series(LineSeries::new(
        vec![(0.0, 0.0), (1.0, 1.0)],
        &RGBColor(180, 180, 180),
    ))
    .map_err(|e| err(&e))?;
    roc.draw_series(LineSeries::new(roc_points(rows), &BLUE))
        .map_err(|e| err(&e))?;

    const BINS: usize = 20;
    let mut hist = [[0u32; BINS]; 2];
    for r in rows {
        if let Some(s) = r.score {
            let b = ((s * BINS as f64) as usize).min(BINS - 1);
            hist[usize::from(r.malicious)][b] += 1;
        }
    }
    let ymax = hist.iter().flatten().copied().max().unwrap_or(1).max(1);
    let mut h = ChartBuilder::on(&right)
        .caption("P(malicious) by label", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(0f64..1f64, 0u32..(ymax + ymax / 10 + 1))
        .map_err(|e| err(&e))?;
    h.configure_mesh()
        .x_desc("P(malicious)")
        .y_desc("rows")
        .draw()
        .map_err(|e| err(&e))?;
    let w = 1.0 / BINS as f64;
    for (label, color) in [(0usize, GREEN.mix(0.5)), (1, RED.mix(0.5))] {
        let name = if label == 1 { "malicious" } else { "benign" };
        h.draw_series(hist[label].iter().enumerate().map(|(i, &c)| {
            let x0 = i as f64 * w;
            Rectangle::new([(x0, 0), (x0 + w, c)], color.filled())
        }))
        .map_err(|e| err(&e))?
        .label(name)
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    h.draw_series(LineSeries::new(
        vec![(threshold, 0), (threshold, ymax)],
        &BLACK,
    ))
    .map_err(|e| err(&e))?
    .label(format!("threshold {threshold:.3}"))
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 10, y)], BLACK));
    h.configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(malicious: bool, score: f64) -> Scored {
        Scored {
            malicious,
            score: Some(score),
        }
    }

    #[test]
    fn roc_of_a_perfect_and_a_tied_ranking() {
        let perfect = [s(true, 0.9), s(true, 0.8), s(false, 0.2), s(false, 0.1)];
        assert_eq!(
            roc_points(&perfect),
            vec![(0.0, 0.0), (0.0, 0.5), (0.0, 1.0), (0.5, 1.0), (1.0, 1.0)]
        );
        // All tied: one step from (0, 0) to (1, 1).
        let tied = [s(true, 0.5), s(false, 0.5)];
        assert_eq!(roc_points(&tied), vec![(0.0, 0.0), (1.0, 1.0)]);
    }

    #[test]
    fn writes_an_svg() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.svg");
        let rows = [s(true, 0.9), s(false, 0.3), s(true, 0.6), s(false, 0.05)];
        write_svg(&p, &rows, 0.5, "test").unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("false-positive rate"));
    }
}
