//! `qpq-gui`: opens the window. The tokio runtime the session runs on is
//! made here and lives until the window closes (it must not move into the
//! window's creation closure, or it would be dropped with it).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use eframe::egui;
use quicproquo_gui::APP_ID;
use quicproquo_gui::app::QpqApp;
use quicproquo_gui::bridge::{Bridge, Paths};
use quicproquo_gui::model::Screen;

/// The quicproquo desktop chat app.
#[derive(Debug, Parser)]
#[command(name = "qpq-gui", version, about)]
struct Args {
    /// The encrypted state file (default: `qpq-state.bin` in the app's data
    /// directory). The server it talks to is kept beside it, in
    /// `<state>.server.json`.
    #[arg(long, env = "QPQ_STATE")]
    state: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
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
            let bridge =
                Bridge::spawn(&handle, Paths::beside(state), move || ctx.request_repaint());
            Ok(Box::new(QpqApp::new(screen, bridge)))
        }),
    )
    .map_err(|e| anyhow::anyhow!("the window failed: {e}"))?;
    drop(runtime);
    Ok(())
}
