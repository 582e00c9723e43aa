//! The fonts the app brings along, built into the binary so text renders
//! whatever the machine has installed: egui's own (Latin, Greek, Cyrillic,
//! and monochrome emoji through its `monochrome_emoji_fonts`), Droid Sans
//! Fallback for Chinese and Japanese, NanumSquare for Korean (`fonts/`,
//! with their licences). A character none of them has is drawn as a
//! replacement box ("tofu"), never a panic.

use eframe::egui;
use eframe::egui::{FontData, FontFamily, FontInsert, FontPriority, InsertFontFamily};

/// Droid Sans Fallback (Apache-2.0): Chinese, Japanese.
const CJK: &[u8] = include_bytes!("../fonts/DroidSansFallbackFull.ttf");

/// NanumSquare Regular (OFL-1.1): Korean.
const HANGUL: &[u8] = include_bytes!("../fonts/NanumSquareR.ttf");

/// Adds the bundled fonts to `ctx`, last in both families' fallback chains
/// so egui's own fonts keep drawing what they cover, and makes a missing
/// glyph a box.
pub fn install(ctx: &egui::Context) {
    for (name, data) in [("droid-sans-fallback", CJK), ("nanum-square", HANGUL)] {
        let families = [FontFamily::Proportional, FontFamily::Monospace]
            .into_iter()
            .map(|family| InsertFontFamily {
                family,
                priority: FontPriority::Lowest,
            })
            .collect();
        ctx.add_font(FontInsert::new(name, FontData::from_static(data), families));
    }
    ctx.set_missing_glyph_policy(egui::MissingGlyphPolicy::Tofu);
}
