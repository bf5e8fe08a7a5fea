//! Plots of a bench matrix (plotters): per metric, one bar per cell at its median with a
//! line from its fastest to its slowest run, as SVG and PNG. The text is drawn with DejaVu
//! Sans (Debian's fonts-dejavu-core), loaded at run time.

use std::path::Path;

use plotters::prelude::*;

/// One bar: label, median, min, max.
pub type Bar = (String, f64, f64, f64);

const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers a font for the PNG backend; false when none is found.
fn font() -> bool {
    static FOUND: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FOUND.get_or_init(|| {
        FONTS.iter().any(|p| match std::fs::read(p) {
            Ok(bytes) => {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
            }
            Err(_) => false,
        })
    })
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    unit: &str,
    bars: &[Bar],
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let top = bars.iter().map(|b| b.3).fold(0.0f64, f64::max).max(1e-9) * 1.15;
    let n = bars.len().max(1);
    // Horizontal bars: the cells' labels read left to right.
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(260)
        .build_cartesian_2d(0f64..top, (0..n).into_segmented())
        .map_err(e)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc(unit)
        .y_labels(n)
        .y_label_style(("sans-serif", 14))
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => bars.get(*i).map(|b| b.0.clone()).unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(e)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (b.1, SegmentValue::Exact(i + 1)),
                ],
                Palette99::pick(i % 3).mix(0.8).filled(),
            )
        }))
        .map_err(e)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            ErrorBar::new_horizontal(
                SegmentValue::CenterOf(i),
                b.2,
                b.1,
                b.3,
                BLACK.stroke_width(2),
                10,
            )
        }))
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// Writes `stem.svg` and `stem.png`; returns the files written.
pub fn bar_chart(
    stem: &Path,
    title: &str,
    unit: &str,
    bars: &[Bar],
) -> Result<Vec<String>, String> {
    // Both backends measure text with the registered font to lay the chart out.
    if !font() {
        return Err(format!(
            "no font for the plots' text (looked for {}; Debian: fonts-dejavu-core)",
            FONTS.join(", ")
        ));
    }
    let height = (120 + 34 * bars.len() as u32).max(300);
    let svg = stem.with_extension("svg");
    draw(
        SVGBackend::new(&svg, (900, height)).into_drawing_area(),
        title,
        unit,
        bars,
    )?;
    let png = stem.with_extension("png");
    draw(
        BitMapBackend::new(&png, (900, height)).into_drawing_area(),
        title,
        unit,
        bars,
    )?;
    Ok(vec![svg.display().to_string(), png.display().to_string()])
}
