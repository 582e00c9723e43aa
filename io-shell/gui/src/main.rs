//! `qpq-gui`: opens the window. The tokio runtime the session runs on is
//! made here and lives until the window closes (it must not move into the
//! window's creation closure, or it would be dropped with it).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use eframe::egui;
use quicproquo_client::DirectArgs;
use quicproquo_gui::APP_ID;
use quicproquo_gui::app::QpqApp;
use quicproquo_gui::bridge::{Bridge, Paths};
use quicproquo_gui::model::Screen;
use quicproquo_gui::stats::Stats;

/// The quicproquo desktop chat app.
#[derive(Debug, Parser)]
#[command(
    name = "qpq-gui",
    version,
    about,
    after_help = "Environment:\n  QPQ_GUI_STATS=<file>  record frame statistics there (time to the first \
                  frame, from Unlock to the main screen, each frame's CPU time), for measuring"
)]
struct Args {
    /// The encrypted state file (default: `qpq-state.bin` in the app's data
    /// directory). The server it talks to is kept beside it, in
    /// `<state>.server.json`.
    #[arg(long, env = "QPQ_STATE")]
    state: Option<PathBuf>,
    #[command(flatten)]
    direct: DirectArgs,
}

fn main() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let args = Args::parse();
    let stats = match std::env::var_os("QPQ_GUI_STATS") {
        Some(path) => Some(
            Stats::create(path.as_ref(), started)
                .with_context(|| format!("creating the stats file {}", path.display()))?,
        ),
        None => None,
    };
    let state = match args.state {
        Some(path) => path,
        None => directories::ProjectDirs::from("chat", "quicproquo", "gui")
            .context("no home directory to keep the app's data in")?
            .data_dir()
            .join("qpq-state.bin"),
    };
    let screen = if state.exists() {
        Screen::Unlock
    } else {
        Screen::FirstRun
    };
    let direct = args.direct.config().map_err(anyhow::Error::msg)?;
    let paths = Paths::beside(state).with_direct(direct);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_app_id(APP_ID)
            .with_title("qpq")
            .with_inner_size([900.0, 640.0]),
        ..Default::default()
    };
    let handle = runtime.handle().clone();
    eframe::run_native(
        "qpq",
        options,
        Box::new(move |cc| {
            let ctx = cc.egui_ctx.clone();
            let bridge = Bridge::spawn(&handle, paths, move || ctx.request_repaint());
            let app = QpqApp::new(screen, bridge);
            Ok(Box::new(match stats {
                Some(stats) => app.with_stats(stats),
                None => app,
            }))
        }),
    )
    .map_err(|e| anyhow::anyhow!("the window failed: {e}"))?;
    drop(runtime);
    Ok(())
}
