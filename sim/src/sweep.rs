//! Seeds and sweeps: which seeds a test runs (from the environment), running
//! a scenario over them, and the failure report that names the scenario,
//! the seed and the command that replays it.
//!
//! - `QPQ_SIM_SEED=N` runs only seed `N` (of whichever scenarios the test
//!   filter selects) and prints its history.
//! - `QPQ_SIM_SEEDS=N` sweeps `N` seeds per scenario, starting at
//!   `QPQ_SIM_SEED_BASE` (default 0).
//! - Otherwise each scenario runs its default number of seeds.
//! - `QPQ_SIM_HISTORY=1` prints the full history of every failing seed.
//! - `QPQ_LOG=filter` logs the server and client (tracing) to the test's
//!   output.

use std::time::{Duration, Instant};

use crate::checker::report;
use crate::coverage::Coverage;
use crate::driver::{Outcome, run};
use crate::scenarios::Scenario;

/// The seeds to run for a scenario whose default sweep is `default` seeds.
pub fn seeds(default: u64) -> Vec<u64> {
    if let Some(seed) = env_u64("QPQ_SIM_SEED") {
        return vec![seed];
    }
    let base = env_u64("QPQ_SIM_SEED_BASE").unwrap_or(0);
    let n = env_u64("QPQ_SIM_SEEDS").unwrap_or(default);
    (base..base.saturating_add(n)).collect()
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name} must be a number, got `{v}`"),
    }
}

/// Runs `scenario` with `seed` and checks it.
pub fn run_seed(scenario: &Scenario, seed: u64) -> Outcome {
    init_logging();
    run((scenario.plan)(seed))
}

/// A long sweep prints a progress line every this many seeds.
const PROGRESS_EVERY: usize = 50;

/// One failed seed, with its report.
#[derive(Debug)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// The report to print.
    pub report: String,
}

/// The result of a sweep.
#[derive(Debug)]
pub struct Sweep {
    /// Seeds run.
    pub seeds: usize,
    /// Seeds that failed.
    pub failures: Vec<Failure>,
    /// Wall time of the sweep.
    pub wall: Duration,
    /// Simulated time of all runs together.
    pub simulated: Duration,
    /// What the runs exercised, added up.
    pub coverage: Coverage,
}

/// Runs `scenario` over `seeds`, printing a line per failure as it happens.
pub fn sweep(scenario: &Scenario, seeds: &[u64]) -> Sweep {
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut simulated = Duration::ZERO;
    let mut coverage = Coverage::default();
    let single = seeds.len() == 1;
    for (n, &seed) in seeds.iter().enumerate() {
        if n > 0 && n % PROGRESS_EVERY == 0 {
            eprintln!(
                "{}: {n}/{} seeds, {} failed, {:.0?} wall",
                scenario.name,
                seeds.len(),
                failures.len(),
                started.elapsed()
            );
        }
        let outcome = run_seed(scenario, seed);
        simulated += outcome.sim_time;
        coverage.add(&Coverage::of(&outcome.history));
        if single || std::env::var_os("QPQ_SIM_HISTORY").is_some() && !outcome.violations.is_empty()
        {
            eprintln!(
                "--- history of {} seed {seed} (digest {:016x}) ---\n{}",
                scenario.name,
                outcome.history.digest(),
                outcome.history
            );
        }
        if !outcome.violations.is_empty() {
            let report = failure_report(scenario, seed, &outcome);
            eprintln!("{report}");
            failures.push(Failure { seed, report });
        }
    }
    Sweep {
        seeds: seeds.len(),
        failures,
        wall: started.elapsed(),
        simulated,
        coverage,
    }
}

/// Sweeps of at least this many seeds must show what their scenario
/// exercises; a single replayed seed need not.
const COVERAGE_SEEDS_MIN: usize = 3;

/// Runs the seeds the environment selects and panics with every failure's
/// report if any seed failed, or if a sweep did not exercise what its
/// scenario is for.
pub fn assert_sweep(scenario: &Scenario) {
    let s = sweep(scenario, &seeds(scenario.default_seeds));
    eprintln!(
        "{}: {} seeds, {} failed, {:.1?} wall, {:.0?} simulated; {}",
        scenario.name,
        s.seeds,
        s.failures.len(),
        s.wall,
        s.simulated,
        s.coverage
    );
    if !s.failures.is_empty() {
        let seeds: Vec<u64> = s.failures.iter().map(|f| f.seed).collect();
        panic!(
            "scenario {} failed for seeds {seeds:?}\n{}",
            scenario.name,
            s.failures
                .iter()
                .map(|f| f.report.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert!(
        s.seeds < COVERAGE_SEEDS_MIN || (scenario.exercised)(&s.coverage),
        "the {} sweep did not exercise {}: {}",
        scenario.name,
        scenario.exercises,
        s.coverage
    );
}

/// Runs one seed and panics with its report if it failed.
pub fn assert_seed(scenario: &Scenario, seed: u64) {
    let outcome = run_seed(scenario, seed);
    if !outcome.violations.is_empty() {
        panic!("{}", failure_report(scenario, seed, &outcome));
    }
}

fn failure_report(scenario: &Scenario, seed: u64, outcome: &Outcome) -> String {
    format!(
        "FAILED scenario {name} seed {seed} ({sim:.1?} simulated, {starts} server starts)\n\
         replay: QPQ_SIM_SEED={seed} cargo test -p quicproquo-sim --test scenarios -- --exact {name}\n{violations}",
        name = scenario.name,
        sim = outcome.sim_time,
        starts = outcome.server_starts,
        violations = report(&outcome.history, &outcome.violations),
    )
}

fn init_logging() {
    if let Ok(filter) = std::env::var("QPQ_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}
