//! The packaging and operator files, checked against the real server:
//!
//! - `packaging/docker-check.sh` runs the Dockerfile's steps on this host
//!   (no container engine needed): the runtime stage with the debug
//!   binaries, the HEALTHCHECK, a clean stop on SIGTERM;
//! - `packaging/systemd/qpq-server.service` passes `systemd-analyze verify`
//!   and keeps its exposure rating low, and its system call filter allows
//!   every call the server makes while it serves (seen with strace);
//! - every metric the Grafana dashboard and the Prometheus alert rules read
//!   is one a running `qpq-server` exports on `metrics_listen`, with the
//!   label names and values they match; both files are well formed.
//!
//! Tools from outside Rust are used when present. Without `systemd-analyze`
//! the unit's tests say `SKIPPED:` and pass, unless
//! `QPQ_SYSTEMD_TESTS=require`; without strace the filter test does the
//! same unless `QPQ_STRACE_TESTS=require`; the script's own optional tools
//! follow `QPQ_PACKAGING_TESTS=require` (`.ci/run` sets all three).
//! `promtool`, when installed, also checks the PromQL of both files; it is
//! not required.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Lines, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

use common::{id, user};
use quicproquo_client::{Client, ServerTrust};
use quicproquo_core::types::{ChannelId, MessageId};

#[test]
fn the_docker_check_script_runs_the_images_steps_on_this_host() {
    let server = PathBuf::from(env!("CARGO_BIN_EXE_qpq-server"));
    let bin_dir = server.parent().unwrap();
    // The image has the CLI too; `cargo test --workspace` builds it, a
    // package-scoped run may not have.
    if !bin_dir.join("qpq").exists() {
        cargo_build(&["--bin", "qpq", "-p", "quicproquo-client"]);
    }
    let out = Command::new("bash")
        .arg(repo().join("packaging/docker-check.sh"))
        .arg("--bin-dir")
        .arg(bin_dir)
        .args(["--port", &free_udp_port().to_string()])
        // A real `docker build` is minutes of work: run by hand, not here.
        .arg("--no-engine")
        .output()
        .expect("bash runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "docker-check.sh failed:\n{text}");
    assert!(text.contains("docker-check: OK"), "{text}");
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    if !usable("systemd-analyze", &["--version"], "QPQ_SYSTEMD_TESTS") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    // verify checks that ExecStart's binary exists, so the copy runs the
    // one this test was built with; everything else is the file as shipped.
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{text}"
    );
    // An unknown or misspelt setting is only a warning naming the file.
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("qpq-server.service"))
        .collect();
    assert!(warnings.is_empty(), "systemd-analyze verify warns:\n{text}");

    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for qpq-server.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure rating in:\n{text}"));
    println!("systemd-analyze security: exposure {exposure} (0 is the least exposed, 10 the most)");
    assert!(
        exposure <= UNIT_EXPOSURE_MAX,
        "the unit's exposure rose to {exposure}:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_units_system_call_filter_allows_every_call_the_server_makes() {
    if !usable("systemd-analyze", &["--version"], "QPQ_SYSTEMD_TESTS")
        || !usable(
            "strace",
            &["-f", "-o", "/dev/null", "true"],
            "QPQ_STRACE_TESTS",
        )
    {
        return;
    }
    let unit = std::fs::read_to_string(repo().join("packaging/systemd/qpq-server.service"))
        .expect("the unit");
    let settings = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_owned)
            .collect()
    };
    // SystemCallFilter= lines add up: a list allows, a list after `~`
    // denies (systemd.exec(5)).
    let (mut allowed, mut denied) = (BTreeSet::new(), BTreeSet::new());
    for filter in settings("SystemCallFilter") {
        let (set, list) = match filter.strip_prefix('~') {
            Some(list) => (&mut denied, list.to_owned()),
            None => (&mut allowed, filter),
        };
        for name in list.split_whitespace() {
            set.extend(syscall_set(name));
        }
    }
    assert!(
        allowed.contains("read") && denied.contains("reboot"),
        "the unit's filter as read here: allowed {allowed:?}, denied {denied:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("strace.log");
    let mut strace = Command::new("strace");
    strace.args(["-f", "-qq", "-o"]).arg(&log);
    // Serving QUIC and the metrics endpoint, as the unit's environment
    // file suggests.
    let metrics_addr = format!("127.0.0.1:{}", free_tcp_port());
    let mut server = ServerProcess::start(Some(strace), dir.path(), Some(&metrics_addr));
    traffic(&server.addr, &server.fingerprint).await;
    scrape(&metrics_addr);
    server.stop();
    let log = std::fs::read_to_string(&log).unwrap();
    let used: BTreeSet<&str> = log
        .lines()
        .filter_map(|l| {
            // `PID name(args) = result`, `PID <... name resumed> ...`, or
            // `PID +++ exited ...`.
            let rest = l.split_once(' ')?.1.trim_start();
            let rest = rest.strip_prefix("<... ").unwrap_or(rest);
            let name = rest.split(['(', ' ']).next()?;
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
                .then_some(name)
                .filter(|n| !n.is_empty())
        })
        .collect();
    assert!(
        used.contains("fdatasync") && used.len() > 20,
        "strace saw too little: {used:?}"
    );
    let refused: Vec<&&str> = used
        .iter()
        .filter(|s| !allowed.contains(**s) || denied.contains(**s))
        .collect();
    assert!(
        refused.is_empty(),
        "the unit's SystemCallFilter would refuse {refused:?}, which qpq-server made while \
         serving (all: {used:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alert_rules_read_only_metrics_the_server_exports() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_addr = format!("127.0.0.1:{}", free_tcp_port());
    let mut server = ServerProcess::start(None, dir.path(), Some(&metrics_addr));
    traffic(&server.addr, &server.fingerprint).await;
    let text = scrape(&metrics_addr);
    server.stop();
    let exported = Exported::read(&text);
    // The traffic made the histograms' series and an error's.
    for name in [
        "qpq_request_duration_seconds_bucket",
        "qpq_fsync_batches_bucket",
        "qpq_request_errors_total",
    ] {
        assert!(exported.samples.contains(name), "no {name} in:\n{text}");
    }

    let mut uses = Vec::new();
    for expr in dashboard_queries() {
        uses.push(("the dashboard", read_promql(&expr)));
    }
    for rule in alert_rules() {
        uses.push(("the alert rules", read_promql(&rule.expr)));
    }
    let methods = quoted_arms(
        "core-sm/src/protocol/messages.rs",
        "pub fn method(&self)",
        // What serve.rs counts a request that did not decode as.
        &["undecodable"],
    );
    let kinds = quoted_arms("io-shell/server/src/observe.rs", "fn kind_name", &[]);
    let mut read = BTreeSet::new();
    for (file, promql) in &uses {
        for name in &promql.metrics {
            assert!(
                exported.names.contains(name) || PROMETHEUS_SERIES.contains(&name.as_str()),
                "{file} reads {name}, which qpq-server does not export; it exports: {:?}",
                exported.names
            );
            read.insert(name.clone());
        }
        for label in &promql.labels {
            assert!(
                exported.labels.contains(label) || PROMETHEUS_LABELS.contains(&label.as_str()),
                "{file} uses the label {label}, which no exported series has"
            );
        }
        for (label, values) in &promql.matched_values {
            let known = match label.as_str() {
                "method" => &methods,
                "kind" => &kinds,
                _ => continue,
            };
            for value in values {
                assert!(
                    known.contains(value),
                    "{file} matches {label}=\"{value}\", which the server never reports \
                     (it reports {known:?})"
                );
            }
        }
    }
    println!("metrics read by the dashboard and the rules, all exported: {read:?}");
}

#[test]
fn the_dashboard_is_well_formed() {
    let path = repo().join("packaging/grafana/qpq-server.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(dash["uid"], "qpq-server");
    assert!(dash["title"].is_string());
    let variables: BTreeSet<&str> = dash["templating"]["list"]
        .as_array()
        .expect("templating variables")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(variables, BTreeSet::from(["datasource", "instance"]));
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for p in panels {
        let title = p["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(p["id"].as_u64().expect("a numeric id")),
            "id twice: {title}"
        );
        let grid = &p["gridPos"];
        for key in ["h", "w", "x", "y"] {
            assert!(grid[key].is_u64(), "{title}: gridPos.{key}");
        }
        assert!(
            grid["x"].as_u64().unwrap() + grid["w"].as_u64().unwrap() <= 24,
            "{title}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert!(refs.insert(t["refId"].as_str().expect("refId")), "{title}");
            let expr = t["expr"].as_str().expect("expr");
            // Every series is narrowed to the chosen instances.
            for m in read_promql(expr).metrics {
                let narrowed = format!("{m}{{instance=~\"$instance\"");
                assert!(
                    expr.contains(&narrowed),
                    "{title}: {m} not narrowed: {expr}"
                );
            }
            queries += 1;
        }
    }
    assert!(queries >= 20, "{queries} queries");
    if let Some(promtool) = promtool() {
        // Each query as a recording rule, with Grafana's variables filled in,
        // so promtool parses its PromQL.
        let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
        for (i, q) in dashboard_queries().iter().enumerate() {
            let q = q
                .replace("$__rate_interval", "5m")
                .replace("$__range", "1h")
                .replace("$instance", ".*");
            rules += &format!("      - record: dashboard:query_{i}\n        expr: {q:?}\n");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dashboard.yml");
        std::fs::write(&file, rules).unwrap();
        promtool_check(&promtool, &file);
    }
}

#[test]
fn the_alert_rules_are_well_formed() {
    let rules = alert_rules();
    assert!(rules.len() >= 6, "{} rules", rules.len());
    let mut names = BTreeSet::new();
    for r in &rules {
        assert!(names.insert(r.alert.clone()), "{} twice", r.alert);
        assert!(
            r.alert.starts_with("Qpq") && r.alert.chars().all(|c| c.is_ascii_alphanumeric()),
            "{}",
            r.alert
        );
        assert!(
            ["critical", "warning"].contains(&r.severity.as_str()),
            "{}: severity {}",
            r.alert,
            r.severity
        );
        assert!(
            !r.summary.is_empty() && !r.description.is_empty(),
            "{}",
            r.alert
        );
        if let Some(d) = &r.for_ {
            let (n, unit) = d.split_at(d.len() - 1);
            assert!(
                n.parse::<u32>().is_ok() && ["s", "m", "h"].contains(&unit),
                "{}: for {d}",
                r.alert
            );
        }
        // Scraped under the job the file's header names.
        assert!(
            r.expr.contains("job=\"qpq-server\""),
            "{}: {}",
            r.alert,
            r.expr
        );
    }
    // What operations.md promises an alert for.
    for name in [
        "QpqServerDown",
        "QpqSyncFailed",
        "QpqWritesRefusedUnavailable",
        "QpqWriteLatencyHigh",
        "QpqRefusedAuthenticationsHigh",
    ] {
        assert!(names.contains(name), "no {name}");
    }
    if let Some(promtool) = promtool() {
        promtool_check(&promtool, &repo().join(ALERTS));
    }
}

#[test]
fn the_yaml_reader_reads_what_the_rules_file_uses() {
    let doc = yaml(
        "# c\na:\n  - name: x # c\n    rules:\n      - alert: A\n        expr: up == 0\n        \
         labels:\n          severity: \"critical\"\n\n      - alert: B\n        expr: 'x'\nb: 1\n",
    );
    let rules = doc.get("a").unwrap().seq()[0].get("rules").unwrap().seq();
    assert_eq!(rules[0].get("expr").unwrap().str(), "up == 0");
    assert_eq!(
        rules[0]
            .get("labels")
            .unwrap()
            .get("severity")
            .unwrap()
            .str(),
        "critical"
    );
    assert_eq!(rules[1].get("expr").unwrap().str(), "x");
    assert_eq!(doc.get("b").unwrap().str(), "1");
    assert_eq!(
        yaml("d: \"a \\\"q\\\" #b\"\n").get("d").unwrap().str(),
        "a \"q\" #b"
    );
}

#[test]
fn the_promql_reader_tells_metrics_from_functions_and_labels() {
    let q = read_promql(
        "sum by (instance, le) (rate(qpq_x_bucket{job=\"a\", method=~\"enqueue|fetch\"}[5m])) \
         / on (instance) group_left max_over_time(qpq_y[1h]) > 0 and up{k!=\"v\"} or vector(0) \
         * 1e3",
    );
    assert_eq!(
        q.metrics,
        BTreeSet::from(["qpq_x_bucket".into(), "qpq_y".into(), "up".into()])
    );
    assert_eq!(
        q.labels,
        BTreeSet::from([
            "instance".into(),
            "le".into(),
            "job".into(),
            "method".into(),
            "k".into()
        ])
    );
    assert_eq!(
        q.matched_values["method"],
        BTreeSet::from(["enqueue".into(), "fetch".into()])
    );
}

/// The workspace's root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Whether `tool args` runs here. If not, says why with `SKIPPED:` and
/// returns false, or fails when `var` is `require`.
fn usable(tool: &str, args: &[&str], var: &str) -> bool {
    let problem = match Command::new(tool)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
    {
        Err(e) => format!("{tool} cannot run ({e})"),
        Ok(o) if !o.status.success() => format!(
            "{tool} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Ok(_) => return true,
    };
    assert!(
        std::env::var(var).as_deref() != Ok("require"),
        "{problem} ({var}=require)"
    );
    eprintln!("SKIPPED: {problem}");
    false
}

/// `promtool`, if installed (it is optional; see the module doc).
fn promtool() -> Option<PathBuf> {
    let found = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("promtool is not installed: PromQL syntax not checked by it");
    }
    found.then(|| PathBuf::from("promtool"))
}

fn promtool_check(promtool: &Path, rules: &Path) {
    let out = Command::new(promtool)
        .args(["check", "rules"])
        .arg(rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules {}:\n{}{}",
        rules.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn cargo_build(args: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .arg("build")
        .args(args)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "cargo build {args:?} failed");
}

/// The unit as shipped, written to `dir` with ExecStart running this
/// build's `qpq-server`.
fn unit_copy(dir: &Path) -> PathBuf {
    let unit = std::fs::read_to_string(repo().join("packaging/systemd/qpq-server.service"))
        .expect("the unit");
    assert_eq!(unit.matches("\nExecStart=").count(), 1);
    let unit: String = unit
        .lines()
        .map(|l| {
            if l.starts_with("ExecStart=") {
                format!("ExecStart={}\n", env!("CARGO_BIN_EXE_qpq-server"))
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let path = dir.join("qpq-server.service");
    std::fs::write(&path, unit).unwrap();
    path
}

/// The system calls of a `systemd-analyze syscall-filter` name: a group
/// (`@system-service`, its nested groups expanded) or one call.
fn syscall_set(name: &str) -> BTreeSet<String> {
    if !name.starts_with('@') {
        return BTreeSet::from([name.to_owned()]);
    }
    let out = Command::new("systemd-analyze")
        .args(["syscall-filter", name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "systemd-analyze syscall-filter {name}"
    );
    let mut set = BTreeSet::new();
    for word in String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        if word.starts_with('@') {
            set.extend(syscall_set(word));
        } else {
            set.insert(word.to_owned());
        }
    }
    set
}

/// A free port on loopback for UDP and for TCP (free when asked; the
/// server binds it a moment later).
fn free_udp_port() -> u16 {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    s.local_addr().unwrap().port()
}

fn free_tcp_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A child `qpq-server` (perhaps under a wrapper such as strace) on a
/// free loopback port, with an empty configuration file.
struct ServerProcess {
    child: Child,
    /// The server's own pid (the child's, or the wrapper's child's).
    pid: u32,
    addr: String,
    fingerprint: String,
    stopped: bool,
}

impl ServerProcess {
    fn start(wrapper: Option<Command>, dir: &Path, metrics: Option<&str>) -> ServerProcess {
        let config = dir.join("none.toml");
        std::fs::write(&config, "").unwrap();
        let wrapped = wrapper.is_some();
        let mut cmd = wrapper.unwrap_or_else(|| Command::new(env!("CARGO_BIN_EXE_qpq-server")));
        if wrapped {
            cmd.arg(env!("CARGO_BIN_EXE_qpq-server"));
        }
        cmd.env("QPQ_LISTEN", "127.0.0.1:0")
            .env("QPQ_DATA_DIR", dir.join("data"))
            .env("QPQ_CONFIG", &config)
            .env("QPQ_LOG", "warn")
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(m) = metrics {
            cmd.env("QPQ_METRICS_LISTEN", m);
        }
        let mut child = cmd.spawn().expect("spawn qpq-server");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = line_after(&mut lines, "qpq-server listening on ")
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned();
        let fingerprint = line_after(&mut lines, "certificate SHA-256 fingerprint: ");
        if metrics.is_some() {
            // Printed once the endpoint is bound.
            line_after(&mut lines, "metrics on ");
        }
        // Drained on a thread of its own so the server never blocks on a
        // full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        let pid = if wrapped {
            let me = child.id();
            std::fs::read_to_string(format!("/proc/{me}/task/{me}/children"))
                .ok()
                .and_then(|c| c.split_whitespace().next()?.parse().ok())
                .expect("the server runs under its wrapper")
        } else {
            child.id()
        };
        ServerProcess {
            child,
            pid,
            addr,
            fingerprint,
            stopped: false,
        }
    }

    /// SIGTERM, as a supervisor stops it; requires a clean exit.
    fn stop(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = self.child.wait().unwrap();
        self.stopped = true;
        assert!(
            exit.success(),
            "qpq-server exited with {exit:?} after SIGTERM"
        );
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = Command::new("kill")
                .args(["-KILL", &self.pid.to_string()])
                .status();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The rest of the first line of `lines` that starts with `prefix`.
fn line_after(lines: &mut Lines<BufReader<ChildStdout>>, prefix: &str) -> String {
    loop {
        let line = lines.next().expect("server exited early").expect("read");
        if let Some(rest) = line.strip_prefix(prefix) {
            return rest.trim().to_owned();
        }
    }
}

/// A little of everything: an authenticated client enqueues, fetches and
/// uploads KeyPackages (so the latency and group-commit histograms get
/// samples), and an unauthenticated one is refused (an error series).
async fn traffic(addr: &str, fingerprint: &str) {
    let trust = ServerTrust::fingerprint_hex(fingerprint).unwrap();
    let (alice_sk, bob) = (user(1), id(&user(2)));
    let mut c = Client::connect(addr, &trust).await.unwrap();
    c.authenticate(&alice_sk).await.unwrap();
    for i in 0..5u8 {
        c.enqueue(bob, ChannelId::DEFAULT, vec![i; 64], MessageId([i; 16]))
            .await
            .unwrap();
    }
    c.upload_key_package(id(&alice_sk), vec![7; 100], false)
        .await
        .unwrap();
    c.fetch(id(&alice_sk), ChannelId::DEFAULT, 0, 10)
        .await
        .unwrap();
    c.close().await;
    let stranger = Client::connect(addr, &trust).await.unwrap();
    let refused = stranger
        .enqueue(bob, ChannelId::DEFAULT, vec![1], MessageId([9; 16]))
        .await;
    assert!(
        refused.is_err(),
        "an enqueue before authenticating is refused"
    );
    stranger.close().await;
}

/// `GET /metrics` over plain HTTP; the body.
fn scrape(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: qpq\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n").unwrap().1.to_owned()
}

/// What a scrape shows: the names of series that have samples, the names
/// any series of a declared family may have (a counter's `_total`, a
/// histogram's `_bucket`, `_sum` and `_count`, ...), and the label names.
struct Exported {
    samples: BTreeSet<String>,
    names: BTreeSet<String>,
    labels: BTreeSet<String>,
}

impl Exported {
    fn read(text: &str) -> Exported {
        let mut e = Exported {
            samples: BTreeSet::new(),
            names: BTreeSet::new(),
            labels: BTreeSet::new(),
        };
        for line in text.lines() {
            if let Some(decl) = line.strip_prefix("# TYPE ") {
                let mut words = decl.split_whitespace();
                let (name, kind) = (words.next().unwrap(), words.next().unwrap());
                let suffixes: &[&str] = match kind {
                    "counter" => &["_total", "_created"],
                    "histogram" => &["_bucket", "_sum", "_count", "_created"],
                    "info" => &["_info"],
                    _ => &[""],
                };
                e.names
                    .extend(suffixes.iter().map(|s| format!("{name}{s}")));
            } else if !line.starts_with('#') && !line.is_empty() {
                let name_end = line.find(['{', ' ']).unwrap_or(line.len());
                let name = &line[..name_end];
                e.samples.insert(name.to_owned());
                e.names.insert(name.to_owned());
                if let Some(labels) = line[name_end..].strip_prefix('{') {
                    let labels = &labels[..labels.find('}').unwrap()];
                    e.labels.extend(
                        labels
                            .split(',')
                            .filter_map(|kv| Some(kv.split_once('=')?.0.to_owned())),
                    );
                }
            }
        }
        e
    }
}

/// Every PromQL query of the dashboard: its panels' and its variables'.
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("packaging/grafana/qpq-server.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        // label_values(METRIC, LABEL) reads METRIC's LABEL.
        if let Some(q) = v["query"]["query"].as_str() {
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
                .unwrap_or_else(|| panic!("a variable query other than label_values: {q}"));
            let (metric, label) = inner.split_once(',').unwrap();
            out.push(format!("count by ({}) ({})", label.trim(), metric.trim()));
        }
    }
    out
}

/// One alerting rule as the test reads it.
struct AlertRule {
    alert: String,
    expr: String,
    for_: Option<String>,
    severity: String,
    summary: String,
    description: String,
}

/// The alert rules file: groups of rules, each with only the keys
/// Prometheus knows.
fn alert_rules() -> Vec<AlertRule> {
    let text = std::fs::read_to_string(repo().join(ALERTS)).unwrap();
    let doc = yaml(&text);
    let Yaml::Map(top) = &doc else {
        panic!("{ALERTS}: not a mapping")
    };
    assert_eq!(top.keys().collect::<Vec<_>>(), ["groups"]);
    let mut rules = Vec::new();
    for group in doc.get("groups").unwrap().seq() {
        assert!(!group.get("name").unwrap().str().is_empty());
        for r in group.get("rules").expect("rules").seq() {
            let Yaml::Map(keys) = r else {
                panic!("a rule is not a mapping: {r:?}")
            };
            for k in keys.keys() {
                assert!(
                    [
                        "alert",
                        "expr",
                        "for",
                        "keep_firing_for",
                        "labels",
                        "annotations"
                    ]
                    .contains(&k.as_str()),
                    "{ALERTS}: unknown key {k} in {r:?}"
                );
            }
            let field = |path: &[&str]| {
                path.iter()
                    .try_fold(r, |node, key| node.get(key))
                    .map(|n| n.str().to_owned())
            };
            rules.push(AlertRule {
                alert: field(&["alert"]).expect("alert"),
                expr: field(&["expr"]).expect("expr"),
                for_: field(&["for"]),
                severity: field(&["labels", "severity"]).expect("labels.severity"),
                summary: field(&["annotations", "summary"]).expect("annotations.summary"),
                description: field(&["annotations", "description"])
                    .expect("annotations.description"),
            });
        }
    }
    rules
}

/// What a PromQL expression reads: the metric names, the label names it
/// matches or groups by, and the values its matchers name per label (the
/// alternatives of a `=~` regex of plain words included).
#[derive(Debug, Default)]
struct PromQl {
    metrics: BTreeSet<String>,
    labels: BTreeSet<String>,
    matched_values: BTreeMap<String, BTreeSet<String>>,
}

/// Reads `expr` (see [`PromQl`]). A reader for the queries in these
/// files, not a PromQL parser: strings, durations, numbers, functions,
/// aggregations and keywords are told apart from metric names.
fn read_promql(expr: &str) -> PromQl {
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
    ];
    const AGGREGATIONS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let mut q = PromQl::default();
    let b = expr.as_bytes();
    let mut i = 0;
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let skip_space = |mut j: usize| {
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        j
    };
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\'' || c == b'`' {
            i = string_end(b, i);
        } else if c == b'[' {
            i += expr[i..].find(']').expect("a closed range") + 1;
        } else if c == b'{' {
            let end = i + expr[i..].find('}').expect("closed matchers");
            let mut rest = &expr[i + 1..end];
            while let Some(op) = rest.find(['=', '!']) {
                let label = rest[..op].trim().trim_start_matches(',').trim();
                let after = rest[op..].trim_start_matches(['=', '!', '~']).trim_start();
                let close = string_end(after.as_bytes(), 0);
                let value = &after[1..close - 1];
                q.labels.insert(label.to_owned());
                if value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '|' || c == '_')
                {
                    q.matched_values
                        .entry(label.to_owned())
                        .or_default()
                        .extend(value.split('|').map(str::to_owned));
                }
                rest = &after[close..];
            }
            i = end + 1;
        } else if c.is_ascii_digit() || c == b'.' {
            while i < b.len() && (ident(b[i]) || b[i] == b'.') {
                i += 1;
            }
        } else if ident(c) {
            let start = i;
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            let next = skip_space(i);
            if [
                "by",
                "without",
                "on",
                "ignoring",
                "group_left",
                "group_right",
            ]
            .contains(&word)
                && b.get(next) == Some(&b'(')
            {
                let close = next + expr[next..].find(')').expect("a closed label list");
                q.labels.extend(
                    expr[next + 1..close]
                        .split(',')
                        .map(|l| l.trim().to_owned())
                        .filter(|l| !l.is_empty()),
                );
                i = close + 1;
            } else if KEYWORDS.contains(&word)
                || AGGREGATIONS.contains(&word)
                || b.get(next) == Some(&b'(')
            {
                // A keyword, an aggregation or a function.
            } else {
                q.metrics.insert(word.to_owned());
            }
        } else {
            i += 1;
        }
    }
    q
}

/// The index just past the quoted string that starts at `b[start]`.
fn string_end(b: &[u8], start: usize) -> usize {
    let quote = b[start];
    let mut j = start + 1;
    while j < b.len() && b[j] != quote {
        if b[j] == b'\\' && quote != b'`' {
            j += 1;
        }
        j += 1;
    }
    assert!(j < b.len(), "an unclosed string");
    j + 1
}

/// The quoted strings the arms of a match produce (`=> "name"`) in the
/// function that starts with `signature` in `file`, plus `extra`: the
/// names the server can give a label.
fn quoted_arms(file: &str, signature: &str, extra: &[&str]) -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo().join(file)).unwrap();
    let at = text
        .find(signature)
        .unwrap_or_else(|| panic!("{signature} in {file}"));
    // The function ends at the first closing brace at its own indentation.
    let indent = at - text[..at].rfind('\n').map_or(0, |n| n + 1);
    let end = format!("\n{}}}\n", " ".repeat(indent));
    let body = &text[at..];
    let body = &body[..body.find(&end).expect("the function's end")];
    let mut out: BTreeSet<String> = body
        .split("=> \"")
        .skip(1)
        .filter_map(|s| Some(s[..s.find('"')?].to_owned()))
        .collect();
    assert!(out.len() >= 5, "{file}: {out:?}");
    out.extend(extra.iter().map(|s| (*s).to_owned()));
    out
}

/// A YAML document of the block style the rules file is written in:
/// mappings, sequences of mappings, plain and quoted scalars, comments.
/// (No flow collections, anchors or multi-line scalars; it panics on
/// what it cannot read rather than misread it.)
#[derive(Debug)]
enum Yaml {
    Map(BTreeMap<String, Yaml>),
    Seq(Vec<Yaml>),
    Str(String),
}

impl Yaml {
    fn get(&self, key: &str) -> Option<&Yaml> {
        match self {
            Yaml::Map(m) => m.get(key),
            _ => None,
        }
    }

    fn seq(&self) -> &[Yaml] {
        match self {
            Yaml::Seq(s) => s,
            other => panic!("not a sequence: {other:?}"),
        }
    }

    fn str(&self) -> &str {
        match self {
            Yaml::Str(s) => s,
            other => panic!("not a scalar: {other:?}"),
        }
    }
}

fn yaml(text: &str) -> Yaml {
    // (indent, content) of each line that is not blank or a comment; a
    // sequence item's dash becomes a line `-` of its own, and what follows
    // it a line two columns further in.
    let mut lines: Vec<(usize, String)> = Vec::new();
    for l in text.lines() {
        if l.trim().is_empty() || l.trim_start().starts_with('#') {
            continue;
        }
        assert!(!l.contains('\t'), "a tab in YAML: {l}");
        let (mut indent, mut content) = (l.len() - l.trim_start().len(), l.trim());
        while let Some(rest) = content
            .strip_prefix("- ")
            .or((content == "-").then_some(""))
        {
            lines.push((indent, "-".to_owned()));
            indent += 2;
            content = rest.trim_start();
        }
        if !content.is_empty() {
            lines.push((indent, content.to_owned()));
        }
    }
    let mut at = 0;
    let doc = yaml_block(&lines, &mut at, 0);
    assert_eq!(
        at,
        lines.len(),
        "YAML left unread from: {:?}",
        lines.get(at)
    );
    doc
}

/// The block starting at `lines[*at]`, indented by `indent`.
fn yaml_block(lines: &[(usize, String)], at: &mut usize, indent: usize) -> Yaml {
    if lines[*at].1 == "-" {
        let mut items = Vec::new();
        while *at < lines.len() && lines[*at] == (indent, "-".to_owned()) {
            *at += 1;
            let inner = lines.get(*at).map_or(0, |l| l.0);
            assert!(inner > indent, "an empty sequence item");
            items.push(yaml_block(lines, at, inner));
        }
        return Yaml::Seq(items);
    }
    let mut map = BTreeMap::new();
    while *at < lines.len() && lines[*at].0 == indent && lines[*at].1 != "-" {
        let content = &lines[*at].1;
        let (key, value) = content
            .split_once(':')
            .unwrap_or_else(|| panic!("not `key: value`: {content}"));
        *at += 1;
        let value = value.trim();
        let node = if value.is_empty() {
            let inner = lines.get(*at).map_or(0, |l| l.0);
            assert!(
                inner > indent || (inner == indent && lines[*at].1 == "-"),
                "{key}: nothing under it"
            );
            yaml_block(lines, at, inner)
        } else {
            Yaml::Str(yaml_scalar(value))
        };
        assert!(
            map.insert(key.trim().to_owned(), node).is_none(),
            "{key} twice"
        );
    }
    assert!(
        *at >= lines.len() || lines[*at].0 < indent,
        "unexpected indentation at {:?}",
        lines[*at]
    );
    Yaml::Map(map)
}

/// A scalar: double-quoted (with `\"` and `\\`), single-quoted, or plain
/// (up to a ` #` comment).
fn yaml_scalar(value: &str) -> String {
    let b = value.as_bytes();
    match b[0] {
        b'"' => {
            let end = string_end(b, 0);
            assert!(value[end..].trim().is_empty() || value[end..].trim().starts_with('#'));
            value[1..end - 1]
                .replace("\\\"", "\"")
                .replace("\\\\", "\\")
        }
        b'\'' => {
            let end = value[1..].find('\'').expect("closed quote") + 1;
            value[1..end].to_owned()
        }
        b'|' | b'>' | b'[' | b'{' | b'&' | b'*' | b'!' => {
            panic!("a YAML form this reader does not read: {value}")
        }
        _ => value.split(" #").next().unwrap().trim().to_owned(),
    }
}

/// The most `systemd-analyze security` may rate the unit's exposure (it is
/// 1.1 with the settings shipped; 2.0 is still "OK", 10 is unprotected).
const UNIT_EXPOSURE_MAX: f64 = 2.0;

/// Series Prometheus makes itself for every target.
const PROMETHEUS_SERIES: &[&str] = &["up"];

/// Labels Prometheus puts on every scraped series, and the buckets' label.
const PROMETHEUS_LABELS: &[&str] = &["job", "instance", "le"];

/// The alert rules file, from the workspace root.
const ALERTS: &str = "packaging/prometheus/qpq-server-alerts.yml";
