//! A progress bar on stderr for long scoring runs: redrawn in place on a terminal,
//! a line per tenth otherwise (CI logs), silent for small jobs.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Below this many items a bar is more noise than help.
const MIN_ITEMS: usize = 500;

pub struct Progress {
    label: String,
    total: usize,
    done: AtomicUsize,
    started: Instant,
    state: Mutex<DrawState>,
    terminal: bool,
    /// Below this many items the bar stays silent.
    min_items: usize,
}

struct DrawState {
    last_draw: Instant,
    last_tenth: usize,
}

impl Progress {
    #[must_use]
    pub fn new(label: impl Into<String>, total: usize) -> Self {
        Self::drawn_from(label, total, MIN_ITEMS)
    }

    /// A bar for items that take seconds each (calls to models), shown for any number of them.
    #[must_use]
    pub fn for_slow_items(label: impl Into<String>, total: usize) -> Self {
        Self::drawn_from(label, total, 1)
    }

    fn drawn_from(label: impl Into<String>, total: usize, min_items: usize) -> Self {
        let now = Instant::now();
        Self {
            label: label.into(),
            total,
            done: AtomicUsize::new(0),
            started: now,
            state: Mutex::new(DrawState {
                last_draw: now.checked_sub(Duration::from_secs(1)).unwrap_or(now),
                last_tenth: 0,
            }),
            terminal: std::io::stderr().is_terminal(),
            min_items,
        }
    }

    /// Records `count` more finished items, redrawing at most ten times a second.
    pub fn advance(&self, count: usize) {
        let done = self.done.fetch_add(count, Ordering::Relaxed) + count;
        if self.total < self.min_items {
            return;
        }
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if self.terminal {
            if state.last_draw.elapsed() >= Duration::from_millis(100) || done >= self.total {
                state.last_draw = Instant::now();
                eprint!("\r{}", self.line(done));
                if done >= self.total {
                    eprintln!();
                }
                let _ = std::io::stderr().flush();
            }
        } else {
            let tenth = done * 10 / self.total.max(1);
            if tenth > state.last_tenth {
                state.last_tenth = tenth;
                eprintln!("{}", self.line(done));
            }
        }
    }

    fn line(&self, done: usize) -> String {
        const WIDTH: usize = 30;
        let filled = done * WIDTH / self.total.max(1);
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-9);
        #[allow(clippy::cast_precision_loss)]
        let rate = done as f64 / elapsed;
        // Slow items (model calls) go a few per second: whole numbers would read 0/s.
        let decimals = usize::from(rate < 10.0);
        format!(
            "{} [{}{}] {done}/{} ({rate:.decimals$}/s)",
            self.label,
            "#".repeat(filled.min(WIDTH)),
            "-".repeat(WIDTH - filled.min(WIDTH)),
            self.total,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_shows_counts_and_bar() {
        let progress = Progress::new("scoring mf", 1000);
        progress.advance(500);
        let line = progress.line(500);
        assert!(
            line.starts_with("scoring mf [###############---------------] 500/1000"),
            "{line}"
        );
    }
}
