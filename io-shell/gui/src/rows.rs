//! Which conversation lines are on screen, so a long conversation draws
//! only those.
//!
//! Lines differ in height (long messages wrap, some start a new day), so
//! every line's height is remembered once drawn and estimated until then.
//! Each frame sums the heights (10,000 additions) to find the first line
//! the viewport shows and the height of the whole conversation; only the
//! lines in view are laid out and drawn. Heights are dropped when the
//! width changes (wrapping changes) or another group is shown, and follow
//! the lines when old ones are dropped from the front.

use std::ops::Range;

/// The height of a line not drawn yet: a sender line and one line of text.
pub const ESTIMATED_HEIGHT: f32 = 40.0;

/// The remembered heights of one group's lines at one width.
#[derive(Debug, Default)]
pub struct Rows {
    group: String,
    width: f32,
    /// The group's `dropped` count these heights were kept at.
    dropped: u64,
    /// Per line; `None` until drawn.
    heights: Vec<Option<f32>>,
}

/// The lines to draw for one viewport.
#[derive(Debug, Clone, PartialEq)]
pub struct Visible {
    /// The lines in view (indexes into the group's lines).
    pub lines: Range<usize>,
    /// Where the first of them starts, from the top of the conversation.
    pub top: f32,
    /// The whole conversation's height.
    pub total: f32,
}

impl Rows {
    /// Brings the heights in line with `group` as it is now: `len` lines
    /// of which `dropped` were dropped from the front since it began, drawn
    /// `width` wide.
    pub fn sync(&mut self, group: &str, width: f32, dropped: u64, len: usize) {
        if self.group != group || (self.width - width).abs() > 0.5 || dropped < self.dropped {
            self.group = group.to_owned();
            self.width = width;
            self.dropped = dropped;
            self.heights.clear();
        }
        let gone = usize::try_from(dropped - self.dropped).unwrap_or(usize::MAX);
        self.heights.drain(..gone.min(self.heights.len()));
        self.dropped = dropped;
        self.heights.resize(len, None);
    }

    /// The lines that `top..bottom` (from the top of the conversation)
    /// shows.
    pub fn visible(&self, top: f32, bottom: f32) -> Visible {
        let mut y = 0.0;
        let mut first = None;
        let mut end = self.heights.len();
        for (i, h) in self.heights.iter().enumerate() {
            let h = h.unwrap_or(ESTIMATED_HEIGHT);
            if first.is_none() && y + h > top {
                first = Some((i, y));
            }
            if first.is_some() && y >= bottom && end == self.heights.len() {
                end = i;
            }
            y += h;
        }
        let (start, start_y) = first.unwrap_or((self.heights.len(), y));
        Visible {
            lines: start..end.max(start),
            top: start_y,
            total: y,
        }
    }

    /// Line `i` was drawn `height` tall; true if that is news (the
    /// conversation's layout changed and wants another frame).
    pub fn measured(&mut self, i: usize, height: f32) -> bool {
        match self.heights.get_mut(i) {
            Some(h) if h.is_none_or(|old| (old - height).abs() > 0.5) => {
                *h = Some(height);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_lines_in_view_are_drawn() {
        let mut rows = Rows::default();
        rows.sync("g", 400.0, 0, 10_000);
        let v = rows.visible(0.0, 100.0);
        assert_eq!(v.lines, 0..3);
        assert_eq!(v.top, 0.0);
        assert_eq!(v.total, 10_000.0 * ESTIMATED_HEIGHT);
        // The bottom of the conversation.
        let bottom = v.total;
        let v = rows.visible(bottom - 100.0, bottom);
        assert_eq!(v.lines, 9_997..10_000);
        assert_eq!(v.top, 9_997.0 * ESTIMATED_HEIGHT);
    }

    #[test]
    fn measured_heights_replace_the_estimate_and_follow_dropped_lines() {
        let mut rows = Rows::default();
        rows.sync("g", 400.0, 0, 4);
        rows.measured(0, 100.0);
        rows.measured(1, 10.0);
        let v = rows.visible(101.0, 109.0);
        assert_eq!(v.lines, 1..2);
        assert_eq!(v.top, 100.0);
        assert_eq!(v.total, 110.0 + 2.0 * ESTIMATED_HEIGHT);
        // Line 0 dropped from the front, one new line: the old line 1 is
        // now line 0 and keeps its height.
        rows.sync("g", 400.0, 1, 4);
        assert_eq!(rows.visible(0.0, 1.0).total, 10.0 + 3.0 * ESTIMATED_HEIGHT);
        // Another width: wrapping changes, everything is estimated again.
        rows.sync("g", 300.0, 1, 4);
        assert_eq!(rows.visible(0.0, 1.0).total, 4.0 * ESTIMATED_HEIGHT);
        // Another group.
        rows.measured(0, 1.0);
        rows.sync("h", 300.0, 0, 2);
        assert_eq!(rows.visible(0.0, 1.0).total, 2.0 * ESTIMATED_HEIGHT);
    }

    #[test]
    fn an_empty_conversation_shows_nothing() {
        let mut rows = Rows::default();
        rows.sync("g", 400.0, 0, 0);
        let v = rows.visible(0.0, 100.0);
        assert_eq!(v.lines, 0..0);
        assert_eq!(v.total, 0.0);
    }
}
