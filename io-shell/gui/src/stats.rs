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
//! Each frame's lines are flushed as it is drawn (a few hundred bytes a
//! frame, and no frames at all while idle). Nothing is recorded without
//! the variable.

use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

/// The recorder, writing to its file.
#[derive(Debug)]
pub struct Stats {
    out: BufWriter<File>,
    started: Instant,
    first_frame: bool,
    unlock_pressed: Option<Instant>,
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
        self.flush();
    }

    /// Writes what is buffered.
    pub fn flush(&mut self) {
        let _ = self.out.flush();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
