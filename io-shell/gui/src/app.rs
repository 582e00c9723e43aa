//! The window: draws the [`Model`] every frame and turns clicks and typing
//! into [`Request`]s for the [`Bridge`]. Drawing never waits: what the
//! session answers arrives as updates, taken at the start of each frame.

use eframe::egui;

use quicproquo_core::types::IdentityKey;

use crate::bridge::{Bridge, Request, parse_key};
use crate::model::{Delivery, Line, Model, Screen, Update, day};
use crate::rows::Rows;
use crate::stats::Stats;

/// Width of the members panel: long keys and names are cut, not let
/// push the conversation aside.
const MEMBERS_PANEL_WIDTH: f32 = 240.0;
/// Room kept beside the message field for the Send button.
const SEND_BUTTON_WIDTH: f32 = 80.0;

/// The app: the view model, the bridge, and what is being typed.
pub struct QpqApp {
    /// What the window shows.
    pub model: Model,
    bridge: Bridge,
    form: Form,
    /// The open conversation's line heights (only the lines in view are
    /// drawn).
    rows: Rows,
    /// The bundled fonts are in the window's context.
    fonts_installed: bool,
    /// Frame statistics, when asked for (`QPQ_GUI_STATS`).
    stats: Option<Stats>,
}

/// The text fields and switches of every screen.
#[derive(Debug, Default)]
struct Form {
    password: String,
    repeat: String,
    server: String,
    fingerprint: String,
    compose: String,
    new_group: String,
    new_group_pq: bool,
    member_key: String,
    contact_name: String,
    show_qr: bool,
    /// The screen's first field had the keyboard focus once (a new
    /// window types into the password field right away).
    focused: bool,
}

impl QpqApp {
    /// An app showing `screen`, talking to the session through `bridge`.
    pub fn new(screen: Screen, bridge: Bridge) -> QpqApp {
        QpqApp {
            model: Model::new(screen),
            bridge,
            form: Form::default(),
            rows: Rows::default(),
            fonts_installed: false,
            stats: None,
        }
    }

    /// Records frame statistics into `stats`.
    pub fn with_stats(mut self, stats: Stats) -> QpqApp {
        self.stats = Some(stats);
        self
    }

    /// Applies `update` as if the session had sent it (tests).
    pub fn apply(&mut self, update: Update) {
        self.model.apply(update);
    }

    /// Takes what the session sent since the last frame.
    pub fn take_updates(&mut self) {
        for u in self.bridge.updates() {
            self.model.apply(u);
        }
    }

    /// Draws one frame into `ui`.
    pub fn draw(&mut self, ui: &mut egui::Ui) {
        if !self.fonts_installed {
            crate::fonts::install(ui.ctx());
            self.fonts_installed = true;
        }
        self.take_updates();
        match self.model.screen {
            Screen::FirstRun => self.first_run(ui),
            Screen::Unlock => self.unlock(ui),
            Screen::Main => self.main(ui),
        }
    }

    fn request(&mut self, request: Request) {
        if let (Request::Open { .. }, Some(stats)) = (&request, &mut self.stats) {
            stats.unlock_pressed();
        }
        self.bridge.request(request);
    }

    fn unlock(&mut self, ui: &mut egui::Ui) {
        egui::CentralPanel::default().show(ui, |ui| {
            ui.heading("Unlock qpq");
            let label = ui.label("Password");
            let field = ui
                .add(egui::TextEdit::singleline(&mut self.form.password).password(true))
                .labelled_by(label.id);
            if !std::mem::replace(&mut self.form.focused, true) {
                field.request_focus();
            }
            let enter = field.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            let button = ui.add_enabled(!self.model.busy, egui::Button::new("Unlock"));
            if (button.clicked() || enter) && !self.model.busy {
                if self.form.password.is_empty() {
                    self.model.notice("the password is empty");
                } else {
                    self.model.busy = true;
                    let password = std::mem::take(&mut self.form.password);
                    self.request(Request::Open { password });
                }
            }
            if self.model.busy {
                ui.label("Opening…");
            }
            notices(ui, &self.model);
        });
    }

    fn first_run(&mut self, ui: &mut egui::Ui) {
        egui::CentralPanel::default().show(ui, |ui| {
            ui.heading("Welcome to qpq");
            ui.label(
                "Make your identity. Its keys stay on this computer, encrypted under a password.",
            );
            let f = &mut self.form;
            let label = ui.label("Password");
            let field = ui
                .add(egui::TextEdit::singleline(&mut f.password).password(true))
                .labelled_by(label.id);
            if !std::mem::replace(&mut f.focused, true) {
                field.request_focus();
            }
            ui.label(format!("Strength: {}", strength(&f.password)));
            let label = ui.label("Repeat password");
            ui.add(egui::TextEdit::singleline(&mut f.repeat).password(true))
                .labelled_by(label.id);
            let label = ui.label("Server address");
            ui.add(egui::TextEdit::singleline(&mut f.server).hint_text("host:7443"))
                .labelled_by(label.id);
            let label = ui.label("Server fingerprint");
            ui.add(
                egui::TextEdit::singleline(&mut f.fingerprint)
                    .hint_text("64 hex digits, as qpq-server prints it"),
            )
            .labelled_by(label.id);
            let button = ui.add_enabled(!self.model.busy, egui::Button::new("Create identity"));
            if button.clicked() && !self.model.busy {
                match first_run_request(&self.form) {
                    Ok(request) => {
                        self.model.busy = true;
                        self.request(request);
                    }
                    Err(why) => self.model.notice(why),
                }
            }
            if self.model.busy {
                ui.label("Creating your identity and registering…");
            }
            notices(ui, &self.model);
        });
    }

    fn main(&mut self, ui: &mut egui::Ui) {
        egui::Panel::top("status").show(ui, |ui| {
            ui.horizontal(|ui| {
                if let Some(short) = self.model.identity_short() {
                    let you = ui.label(format!("You: {short}"));
                    if let Some(hex) = self.model.identity_hex() {
                        // Cut on screen, whole for screen readers (and
                        // tests): the key others paste to add this user.
                        ui.ctx()
                            .accesskit_node_builder(you.id, |node| node.set_description(hex));
                    }
                }
                if ui.button("Copy my key").clicked()
                    && let Some(hex) = self.model.identity_hex()
                {
                    ui.ctx().copy_text(hex);
                }
                ui.toggle_value(&mut self.form.show_qr, "My key as QR code");
                ui.separator();
                ui.label(self.model.connection.label());
                if !self.model.registered {
                    ui.label("· registering…");
                }
            });
            if self.form.show_qr
                && let Some(hex) = self.model.identity_hex()
            {
                qr(ui, &hex);
            }
            notices(ui, &self.model);
        });
        egui::Panel::left("groups").show(ui, |ui| self.group_list(ui));
        if self.model.selected.is_some() {
            egui::Panel::right("members")
                .exact_size(MEMBERS_PANEL_WIDTH)
                .show(ui, |ui| self.members(ui));
        }
        if self.model.selected.is_some() {
            egui::Panel::bottom("compose").show(ui, |ui| self.compose(ui));
        }
        egui::CentralPanel::default().show(ui, |ui| self.conversation(ui));
    }

    fn group_list(&mut self, ui: &mut egui::Ui) {
        ui.heading("Groups");
        let mut open = None;
        for (name, g) in &self.model.groups {
            let mut text = name.clone();
            if g.pq {
                text.push_str(" [pq]");
            }
            if g.unread > 0 {
                text.push_str(&format!(" ({} new)", g.unread));
            }
            if g.waiting > 0 {
                text.push_str(" · waiting for server");
            }
            let selected = self.model.selected.as_deref() == Some(name.as_str());
            if ui.selectable_label(selected, text).clicked() {
                open = Some(name.clone());
            }
            if let Some(p) = g.preview() {
                ui.small(preview(p));
            }
        }
        if let Some(name) = open {
            self.model.select(&name);
        }
        ui.separator();
        let label = ui.label("New group");
        // A fixed id: not one counted from the widgets above it, which
        // changes with every group listed (and with it the field's state
        // and its node in the accessibility tree).
        ui.add(egui::TextEdit::singleline(&mut self.form.new_group).id_salt("new group"))
            .labelled_by(label.id);
        ui.checkbox(&mut self.form.new_group_pq, "Post-quantum");
        if ui.button("Create group").clicked() {
            let name = self.form.new_group.trim().to_owned();
            if name.is_empty() {
                self.model.notice("a group needs a name");
            } else {
                self.form.new_group.clear();
                let pq = self.form.new_group_pq;
                self.request(Request::CreateGroup { name, pq });
            }
        }
        ui.separator();
        if ui.button("Update my keys").clicked() {
            self.request(Request::UpdateKeys);
        }
    }

    fn conversation(&mut self, ui: &mut egui::Ui) {
        let Some(name) = self.model.selected.clone() else {
            ui.label("No group yet: create one, or ask someone to add you.");
            return;
        };
        let Some(g) = self.model.groups.get(&name) else {
            return;
        };
        ui.horizontal(|ui| {
            ui.heading(&name);
            ui.label(format!("{} members", g.members));
        });
        ui.separator();
        let rows = &mut self.rows;
        egui::ScrollArea::vertical()
            .stick_to_bottom(true)
            .auto_shrink([false, false])
            .show_viewport(ui, |ui, viewport| {
                rows.sync(&name, ui.available_width(), g.dropped, g.lines.len());
                let shown = rows.visible(viewport.min.y, viewport.max.y);
                // The whole conversation's height, as far as it is known;
                // lines measured now count from the next frame.
                ui.set_height(shown.total);
                let origin = ui.max_rect().min;
                let rect = egui::Rect::from_min_max(
                    origin + egui::vec2(0.0, shown.top),
                    egui::pos2(
                        ui.max_rect().right(),
                        origin.y + shown.top + viewport.height(),
                    ),
                );
                let mut changed = false;
                ui.scope_builder(egui::UiBuilder::new().max_rect(rect), |ui| {
                    for i in shown.lines.clone() {
                        let top = ui.cursor().top();
                        ui.push_id(g.dropped + i as u64, |ui| {
                            if let Some(today) = new_day(&g.lines, i) {
                                ui.separator();
                                ui.label(egui::RichText::new(today).small().weak());
                            }
                            draw_line(ui, &g.lines[i]);
                        });
                        changed |= rows.measured(i, ui.cursor().top() - top);
                    }
                });
                if changed {
                    ui.ctx().request_repaint();
                }
            });
    }

    fn members(&mut self, ui: &mut egui::Ui) {
        let Some(name) = self.model.selected.clone() else {
            return;
        };
        let Some(g) = self.model.groups.get(&name) else {
            return;
        };
        ui.heading("Members");
        let me = self.model.identity;
        let keys = g.member_keys.clone();
        let safety = g.safety_number.clone();
        let mut remove = None;
        let mut naming = None;
        for key in &keys {
            let who = self.model.who(key);
            let direct = self.model.direct.contains(key);
            ui.push_id(key.as_bytes(), |ui| {
                ui.add(egui::Label::new(&who).truncate());
                if direct {
                    // Reached over a direct link: messages to them need no
                    // server.
                    ui.small("reached directly");
                }
                if Some(*key) != me {
                    ui.horizontal(|ui| {
                        // Short on screen, whole for screen readers.
                        let button = ui.small_button("Remove");
                        if labelled(button, format!("Remove {who}")).clicked() {
                            remove = Some(*key);
                        }
                        let button = ui.small_button("Name");
                        if labelled(button, format!("Name {who}")).clicked() {
                            naming = Some(*key);
                        }
                    });
                }
            });
        }
        let label = ui.label("Contact name");
        // Fixed ids, as for "New group": the member list above grows.
        ui.add(egui::TextEdit::singleline(&mut self.form.contact_name).id_salt("contact name"))
            .labelled_by(label.id);
        ui.separator();
        let label = ui.label("Member key");
        ui.add(
            egui::TextEdit::singleline(&mut self.form.member_key)
                .id_salt("member key")
                .hint_text("paste their identity key"),
        )
        .labelled_by(label.id);
        let add = ui.button("Add member").clicked();
        ui.separator();
        match safety {
            Some(digits) => {
                ui.label("Safety number (compare it with the others):");
                ui.monospace(digits);
            }
            None => {
                if ui.button("Show safety number").clicked() {
                    self.request(Request::SafetyNumber {
                        group: name.clone(),
                    });
                }
            }
        }
        if let Some(member) = remove {
            self.request(Request::RemoveMember {
                group: name.clone(),
                member,
            });
        }
        if let Some(key) = naming {
            self.name_contact(key);
        }
        if add {
            let key = std::mem::take(&mut self.form.member_key);
            match parse_key(&key) {
                Ok(_) => self.request(Request::AddMember {
                    group: name.clone(),
                    key,
                }),
                Err(why) => {
                    self.form.member_key = key;
                    self.model.notice(why);
                }
            }
        }
        ui.separator();
        if ui.button("Leave group").clicked() {
            self.request(Request::Leave { group: name });
        }
    }

    fn name_contact(&mut self, key: IdentityKey) {
        let name = self.form.contact_name.trim().to_owned();
        if name.is_empty() {
            self.model.notice("type a contact name first");
            return;
        }
        self.form.contact_name.clear();
        self.request(Request::NameContact { name, key });
    }

    fn compose(&mut self, ui: &mut egui::Ui) {
        let Some(group) = self.model.selected.clone() else {
            return;
        };
        ui.horizontal(|ui| {
            let label = ui.label("Message");
            let field = ui
                .add(
                    egui::TextEdit::multiline(&mut self.form.compose)
                        .desired_rows(2)
                        .desired_width((ui.available_width() - SEND_BUTTON_WIDTH).max(120.0)),
                )
                .labelled_by(label.id);
            // Enter sends, Shift+Enter is a new line.
            let enter = field.has_focus()
                && ui.input(|i| i.key_pressed(egui::Key::Enter) && !i.modifiers.shift);
            if enter {
                // The Enter typed a line break into the field: not part of
                // the message.
                if self.form.compose.ends_with('\n') {
                    self.form.compose.pop();
                }
            }
            if ui.button("Send").clicked() || enter {
                let text = std::mem::take(&mut self.form.compose);
                if !text.trim().is_empty() {
                    self.request(Request::Send { group, text });
                }
            }
        });
    }
}

impl eframe::App for QpqApp {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        self.draw(ui);
        if let Some(stats) = &mut self.stats {
            let lines = (self.model.selected.as_ref())
                .and_then(|g| self.model.groups.get(g))
                .map_or(0, |g| g.lines.len());
            stats.frame(
                frame.info().cpu_usage,
                self.model.screen == Screen::Main,
                lines,
            );
        }
    }

    fn on_exit(&mut self, _gl: Option<&eframe::glow::Context>) {
        if let Some(stats) = &mut self.stats {
            stats.flush();
        }
    }
}

/// The request the first-run form makes, or why it cannot yet.
fn first_run_request(f: &Form) -> Result<Request, String> {
    if f.password.is_empty() {
        return Err("choose a password".into());
    }
    if f.password != f.repeat {
        return Err("the two passwords differ".into());
    }
    let server = f.server.trim();
    if server.is_empty() {
        return Err("enter the server's address (host:port)".into());
    }
    let fingerprint: String = f
        .fingerprint
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    if fingerprint.len() != 64 || !fingerprint.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err("the server fingerprint is 64 hex digits".into());
    }
    Ok(Request::Create {
        password: f.password.clone(),
        server: server.to_owned(),
        fingerprint,
    })
}

/// A rough hint of a password's strength: length and kinds of characters.
pub fn strength(password: &str) -> &'static str {
    let kinds = [
        password.chars().any(|c| c.is_ascii_lowercase()),
        password.chars().any(|c| c.is_ascii_uppercase()),
        password.chars().any(|c| c.is_ascii_digit()),
        password.chars().any(|c| !c.is_ascii_alphanumeric()),
    ]
    .iter()
    .filter(|k| **k)
    .count();
    match (password.chars().count(), kinds) {
        (0, _) => "none",
        (n, _) if n < 8 => "weak",
        (n, k) if n >= 16 || (n >= 12 && k >= 3) => "strong",
        _ => "fair",
    }
}

fn draw_line(ui: &mut egui::Ui, line: &Line) {
    match line {
        Line::Message {
            sender,
            text,
            sent_at_ms,
            delivery,
            ..
        } => {
            let time = sent_at_ms.map(clock).unwrap_or_default();
            let state = match delivery {
                Some(Delivery::Sending) => " · sending",
                Some(Delivery::Stored) => " · delivered",
                None => "",
            };
            ui.label(egui::RichText::new(format!("{sender} {time}{state}")).small());
            ui.add(egui::Label::new(text.as_str()).wrap());
        }
        Line::System(text) => {
            ui.label(egui::RichText::new(text.as_str()).italics().weak());
        }
    }
}

/// The day line `i` starts, when it is the first of that day (UTC) among
/// the timed lines.
fn new_day(lines: &[Line], i: usize) -> Option<String> {
    let sent = |l: &Line| match l {
        Line::Message {
            sent_at_ms: Some(ms),
            ..
        } => Some(*ms),
        _ => None,
    };
    let ms = sent(&lines[i])?;
    let previous = lines[..i].iter().rev().find_map(sent);
    match previous {
        Some(p) if p / DAY_MS == ms / DAY_MS => None,
        _ => Some(day(ms)),
    }
}

/// A day in milliseconds (days are UTC, as [`day`] names them).
const DAY_MS: u64 = 86_400_000;

fn notices(ui: &mut egui::Ui, model: &Model) {
    for n in &model.notices {
        ui.colored_label(ui.visuals().warn_fg_color, n.as_str());
    }
}

/// `response` with `label` as its name for assistive technology (and
/// tests), whatever it shows.
fn labelled(response: egui::Response, label: String) -> egui::Response {
    response.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Button, true, &label));
    response
}

/// `text` as a QR code, one painted square per module.
fn qr(ui: &mut egui::Ui, text: &str) {
    let Ok(code) = qrcode::QrCode::new(text.as_bytes()) else {
        return;
    };
    let width = code.width();
    let colors = code.to_colors();
    let module = 4.0;
    // A quiet zone of four modules around the code.
    let side = (width as f32 + 8.0) * module;
    let (response, painter) = ui.allocate_painter(egui::vec2(side, side), egui::Sense::hover());
    let origin = response.rect.min;
    painter.rect_filled(response.rect, 0.0, egui::Color32::WHITE);
    for (i, c) in colors.iter().enumerate() {
        if *c == qrcode::Color::Dark {
            let (x, y) = ((i % width) as f32 + 4.0, (i / width) as f32 + 4.0);
            let min = origin + egui::vec2(x * module, y * module);
            painter.rect_filled(
                egui::Rect::from_min_size(min, egui::vec2(module, module)),
                0.0,
                egui::Color32::BLACK,
            );
        }
    }
}

/// The first line of a message, shortened for the group list.
fn preview(text: &str) -> String {
    let first = text.lines().next().unwrap_or_default();
    let mut short: String = first.chars().take(40).collect();
    if short.len() < first.len() {
        short.push('…');
    }
    short
}

/// `ms` since the Unix epoch as `HH:MM` (UTC).
fn clock(ms: u64) -> String {
    let minutes = ms / 60_000;
    format!("{:02}:{:02}", (minutes / 60) % 24, minutes % 60)
}
