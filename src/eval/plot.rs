//! The evaluation plot, drawn in Rust: performance against strong-model calls, one line
//! per router, the two models as dashed reference lines and the oracle's curve.
//!
//! A small raster canvas with an 8x8 bitmap font keeps this free of font files and
//! system libraries, so it renders the same on any machine and in a slim container.

use std::io::Write;
use std::path::Path;

use font8x8::UnicodeFonts;

use crate::error::Error;

const WIDTH: usize = 1000;
const HEIGHT: usize = 600;
const LEFT: usize = 90;
const RIGHT: usize = 30;
const TOP: usize = 60;
const BOTTOM: usize = 70;

type Rgb = [u8; 3];
const WHITE: Rgb = [255, 255, 255];
const BLACK: Rgb = [0, 0, 0];
const GRID: Rgb = [225, 225, 225];
const GREY: Rgb = [128, 128, 128];
const RED: Rgb = [214, 39, 40];
/// matplotlib's default cycle, so plots look like RouteLLM's.
const PALETTE: [Rgb; 9] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [188, 189, 34],
    [23, 190, 207],
    [127, 127, 127],
];

/// A line to draw: points as (strong %, score).
pub struct Series<'a> {
    pub label: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// Everything the plot shows.
pub struct PlotSpec<'a> {
    pub title: &'a str,
    pub routers: Vec<Series<'a>>,
    pub optimal: Option<Series<'a>>,
    pub weak: (&'a str, f64),
    pub strong: (&'a str, f64),
}

struct Canvas {
    pixels: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Self {
            pixels: vec![255; WIDTH * HEIGHT * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, color: Rgb) {
        if let (Ok(x), Ok(y)) = (usize::try_from(x), usize::try_from(y)) {
            if x < WIDTH && y < HEIGHT {
                let at = (y * WIDTH + x) * 3;
                self.pixels[at..at + 3].copy_from_slice(&color);
            }
        }
    }

    fn dot(&mut self, x: i64, y: i64, radius: i64, color: Rgb) {
        for dy in -radius..=radius {
            for dx in -radius..=radius {
                self.set(x + dx, y + dy, color);
            }
        }
    }

    /// A line of the given half-width; `dash` > 0 draws `dash` pixels on, `dash` off.
    fn line(&mut self, from: (i64, i64), to: (i64, i64), half_width: i64, dash: i64, color: Rgb) {
        let (mut x, mut y) = from;
        let dx = (to.0 - x).abs();
        let dy = -(to.1 - y).abs();
        let step_x = if x < to.0 { 1 } else { -1 };
        let step_y = if y < to.1 { 1 } else { -1 };
        let mut error = dx + dy;
        let mut walked = 0;
        loop {
            if dash == 0 || (walked / dash) % 2 == 0 {
                self.dot(x, y, half_width, color);
            }
            if (x, y) == to {
                break;
            }
            let doubled = 2 * error;
            if doubled >= dy {
                error += dy;
                x += step_x;
            }
            if doubled <= dx {
                error += dx;
                y += step_y;
            }
            walked += 1;
        }
    }

    /// Text at (x, y) top-left, each font pixel drawn as `scale` x `scale`.
    fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, color: Rgb) {
        for (position, character) in text.chars().enumerate() {
            let glyph = font8x8::BASIC_FONTS
                .get(character)
                .or_else(|| font8x8::BASIC_FONTS.get('?'))
                .unwrap_or([0; 8]);
            #[allow(clippy::cast_possible_wrap)]
            let left = x + position as i64 * 8 * scale;
            for (row, bits) in glyph.iter().enumerate() {
                for column in 0..8 {
                    if bits & (1 << column) != 0 {
                        for sy in 0..scale {
                            for sx in 0..scale {
                                #[allow(clippy::cast_possible_wrap)]
                                self.set(left + column * scale + sx, y + row as i64 * scale + sy, color);
                            }
                        }
                    }
                }
            }
        }
    }

    fn text_width(text: &str, scale: i64) -> i64 {
        i64::try_from(text.chars().count()).unwrap_or(0) * 8 * scale
    }

    fn write_png(&self, path: &Path) -> Result<(), Error> {
        let file = std::fs::File::create(path).map_err(|error| Error::io(path.display().to_string(), error))?;
        let mut writer = std::io::BufWriter::new(file);
        let png_error = |error: png::EncodingError| Error::Internal(format!("{}: {error}", path.display()));
        #[allow(clippy::cast_possible_truncation)]
        let mut encoder = png::Encoder::new(&mut writer, WIDTH as u32, HEIGHT as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut png = encoder.write_header().map_err(png_error)?;
        png.write_image_data(&self.pixels).map_err(png_error)?;
        png.finish().map_err(png_error)?;
        writer
            .flush()
            .map_err(|error| Error::io(path.display().to_string(), error))
    }
}

/// A tick step of 1, 2 or 5 times a power of ten giving about six ticks.
fn nice_step(span: f64) -> f64 {
    let raw = span / 6.0;
    let magnitude = 10_f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|factor| factor * magnitude)
        .find(|step| *step >= raw)
        .unwrap_or(magnitude * 10.0)
}

/// The value range on screen and the mapping from data to pixels.
#[derive(Clone, Copy)]
struct Frame {
    y_min: f64,
    y_max: f64,
}

impl Frame {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_precision_loss,
        clippy::cast_possible_wrap
    )]
    fn to_px(self, pct: f64, value: f64) -> (i64, i64) {
        let plot_width = (WIDTH - LEFT - RIGHT) as f64;
        let plot_height = (HEIGHT - TOP - BOTTOM) as f64;
        (
            LEFT as i64 + (pct / 100.0 * plot_width).round() as i64,
            TOP as i64 + ((self.y_max - value) / (self.y_max - self.y_min) * plot_height).round() as i64,
        )
    }
}

/// Renders `spec` to a PNG at `path`.
pub fn render(spec: &PlotSpec<'_>, path: &Path) -> Result<(), Error> {
    let mut values: Vec<f64> = spec
        .routers
        .iter()
        .chain(spec.optimal.iter())
        .flat_map(|series| series.points.iter().map(|point| point.1))
        .chain([spec.weak.1, spec.strong.1])
        .filter(|value| value.is_finite())
        .collect();
    values.sort_by(f64::total_cmp);
    let (Some(&low), Some(&high)) = (values.first(), values.last()) else {
        return Err(Error::invalid("nothing to plot"));
    };
    let padding = ((high - low) * 0.05).max(1e-6);
    let frame = Frame {
        y_min: low - padding,
        y_max: high + padding,
    };

    let mut canvas = Canvas::new();
    draw_axes(&mut canvas, frame);
    let mut legend: Vec<(String, Rgb, bool)> = Vec::new();
    for (label, value, color) in [(spec.weak.0, spec.weak.1, GREY), (spec.strong.0, spec.strong.1, RED)] {
        canvas.line(frame.to_px(0.0, value), frame.to_px(100.0, value), 0, 6, color);
        legend.push((label.to_owned(), color, true));
    }
    for (index, series) in spec.routers.iter().enumerate() {
        let color = PALETTE[index % PALETTE.len()];
        draw_series(&mut canvas, frame, series, color, false);
        legend.push((series.label.to_owned(), color, false));
    }
    if let Some(optimal) = &spec.optimal {
        let color = PALETTE[spec.routers.len() % PALETTE.len()];
        draw_series(&mut canvas, frame, optimal, color, true);
        legend.push((optimal.label.to_owned(), color, false));
    }
    draw_legend(
        &mut canvas,
        &legend,
        frame.to_px(0.0, frame.y_min),
        frame.to_px(100.0, frame.y_max),
    );

    let title_width = Canvas::text_width(spec.title, 2);
    #[allow(clippy::cast_possible_wrap)]
    canvas.text((WIDTH as i64 - title_width) / 2, 20, spec.title, 2, BLACK);
    let x_label = "Strong Model Calls (%)";
    #[allow(clippy::cast_possible_wrap)]
    canvas.text(
        (WIDTH as i64 - Canvas::text_width(x_label, 1)) / 2,
        HEIGHT as i64 - 30,
        x_label,
        1,
        BLACK,
    );
    canvas.text(10, frame.to_px(0.0, frame.y_max).1 - 20, "Performance", 1, BLACK);
    canvas.write_png(path)
}

/// Grid lines, tick labels and the axes box.
fn draw_axes(canvas: &mut Canvas, frame: Frame) {
    let (_, top) = frame.to_px(0.0, frame.y_max);
    let (_, bottom) = frame.to_px(0.0, frame.y_min);
    for tick in (0..=100).step_by(10) {
        let (x, _) = frame.to_px(f64::from(tick), frame.y_min);
        canvas.line((x, top), (x, bottom), 0, 0, GRID);
        let label = tick.to_string();
        canvas.text(x - Canvas::text_width(&label, 1) / 2, bottom + 8, &label, 1, BLACK);
    }
    let step = nice_step(frame.y_max - frame.y_min);
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    let mut tick = (frame.y_min / step).ceil() * step;
    while tick <= frame.y_max {
        let (left, y) = frame.to_px(0.0, tick);
        let (right, _) = frame.to_px(100.0, tick);
        canvas.line((left, y), (right, y), 0, 0, GRID);
        let label = format!("{tick:.decimals$}");
        canvas.text(left - 8 - Canvas::text_width(&label, 1), y - 4, &label, 1, BLACK);
        tick += step;
    }
    let (x0, y0) = frame.to_px(0.0, frame.y_min);
    let (x1, y1) = frame.to_px(100.0, frame.y_max);
    for (from, to) in [
        ((x0, y0), (x1, y0)),
        ((x0, y1), (x1, y1)),
        ((x0, y0), (x0, y1)),
        ((x1, y0), (x1, y1)),
    ] {
        canvas.line(from, to, 0, 0, BLACK);
    }
}

/// A series as a line with a marker per point: dots, or crosses for the oracle.
fn draw_series(canvas: &mut Canvas, frame: Frame, series: &Series<'_>, color: Rgb, cross: bool) {
    let mut points = series.points.clone();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    for pair in points.windows(2) {
        canvas.line(
            frame.to_px(pair[0].0, pair[0].1),
            frame.to_px(pair[1].0, pair[1].1),
            1,
            0,
            color,
        );
    }
    for point in &points {
        let (x, y) = frame.to_px(point.0, point.1);
        if cross {
            canvas.line((x - 4, y - 4), (x + 4, y + 4), 0, 0, color);
            canvas.line((x - 4, y + 4), (x + 4, y - 4), 0, 0, color);
        } else {
            canvas.dot(x, y, 3, color);
        }
    }
}

/// The legend box, bottom right inside the axes: curves rise from the bottom left to the top right.
fn draw_legend(canvas: &mut Canvas, legend: &[(String, Rgb, bool)], (_, y0): (i64, i64), (x1, _): (i64, i64)) {
    let legend_width = legend
        .iter()
        .map(|(label, ..)| Canvas::text_width(label, 1))
        .max()
        .unwrap_or(0)
        + 50;
    let legend_height = i64::try_from(legend.len()).unwrap_or(0) * 16 + 10;
    let (lx, ly) = (x1 - legend_width - 10, y0 - legend_height - 10);
    for y in ly..ly + legend_height {
        for x in lx..lx + legend_width {
            canvas.set(x, y, WHITE);
        }
    }
    canvas.line((lx, ly), (lx + legend_width, ly), 0, 0, GRID);
    canvas.line(
        (lx, ly + legend_height),
        (lx + legend_width, ly + legend_height),
        0,
        0,
        GRID,
    );
    for (row, (label, color, dashed)) in legend.iter().enumerate() {
        let y = ly + 12 + i64::try_from(row).unwrap_or(0) * 16;
        canvas.line(
            (lx + 8, y),
            (lx + 34, y),
            i64::from(!*dashed),
            if *dashed { 5 } else { 0 },
            *color,
        );
        canvas.text(lx + 42, y - 4, label, 1, BLACK);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_valid_png_with_lines_in_series_colours() {
        let scratch = tempfile::tempdir().unwrap();
        let path = scratch.path().join("plot.png");
        let spec = PlotSpec {
            title: "Model Calls and Performance (test)",
            routers: vec![Series {
                label: "random",
                points: vec![(0.0, 60.0), (50.0, 70.0), (100.0, 80.0)],
            }],
            optimal: Some(Series {
                label: "Optimal",
                points: vec![(0.0, 60.0), (100.0, 90.0)],
            }),
            weak: ("weak", 60.0),
            strong: ("strong", 80.0),
        };
        render(&spec, &path).unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buffer = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buffer).unwrap();
        assert_eq!((info.width, info.height), (1000, 600));
        let pixels: Vec<&[u8]> = buffer[..info.buffer_size()].chunks(3).collect();
        assert!(pixels.iter().any(|p| *p == PALETTE[0]), "the router's line is drawn");
        assert!(pixels.iter().any(|p| *p == RED), "the strong reference is drawn");
        assert!(pixels.iter().any(|p| *p == BLACK), "text and axes are drawn");
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(30.0), 5.0);
        assert_eq!(nice_step(1.0), 0.2);
        assert_eq!(nice_step(600.0), 100.0);
    }
}
