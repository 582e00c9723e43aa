//! Frame statistics for measuring the app (`QPQ_GUI_STATS=<file>`): the
//! time from start to the first frame, from pressing Unlock to the first
//! frame of the main screen, and every frame's CPU time, written as text
//! lines so a script can cut out the part it measures (idle, scrolling).
//!
//! ```text
//! first_frame <ms since start>
//! unlocked <ms from Unlock to the first main-screen frame>
//! frame <ms since start> <CPU ms of the previous frame> <lines in the open conversation>
//! ```
//!
//! The file is flushed at most once a second and when the window closes.
//! Nothing is recorded without the variable.

use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

/// How often the lines reach the file.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// The recorder, writing to its file.
#[derive(Debug)]
pub struct Stats {
    out: BufWriter<File>,
    started: Instant,
    first_frame: bool,
    unlock_pressed: Option<Instant>,
    flushed: Instant,
}

impl Stats {
    /// Records into `path` (created or truncated), counting from `started`
    /// (the process's start).
    pub fn create(path: &Path, started: Instant) -> std::io::Result<Stats> {
        Ok(Stats {
            out: BufWriter::new(File::create(path)?),
            started,
            first_frame: false,
            unlock_pressed: None,
            flushed: Instant::now(),
        })
    }

    /// Unlock was pressed.
    pub fn unlock_pressed(&mut self) {
        self.unlock_pressed = Some(Instant::now());
    }

    /// A frame is being drawn; `cpu` is the previous frame's CPU time, as
    /// eframe measured it, and `main` whether this one shows the main
    /// screen.
    pub fn frame(&mut self, cpu: Option<f32>, main: bool, lines: usize) {
        let now = Instant::now();
        let since_start = ms(now - self.started);
        // Best effort: a full disk must not stop the window.
        if !self.first_frame {
            self.first_frame = true;
            let _ = writeln!(self.out, "first_frame {since_start:.1}");
        }
        if main && let Some(pressed) = self.unlock_pressed.take() {
            let _ = writeln!(self.out, "unlocked {:.1}", ms(now - pressed));
        }
        let cpu_ms = cpu.map_or(0.0, |s| f64::from(s) * 1000.0);
        let _ = writeln!(self.out, "frame {since_start:.1} {cpu_ms:.3} {lines}");
        if now - self.flushed >= FLUSH_EVERY {
            self.flush();
        }
    }

    /// Writes what is buffered.
    pub fn flush(&mut self) {
        let _ = self.out.flush();
        self.flushed = Instant::now();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
