//! The CLI's progress display: one indicatif bar per step (load, match, prove, save, verify),
//! with its rate and ETA, drawn on stderr only when stderr is a terminal and neither --quiet
//! nor --json was given. Each finished step stays on screen with the time it took.

use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::progress::{Progress, Unit};

pub struct Bars {
    on: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl Bars {
    /// Bars drawn when `on` and stderr is a terminal (indicatif hides them otherwise).
    pub fn new(on: bool) -> Bars {
        Bars { on: on && std::io::IsTerminal::is_terminal(&std::io::stderr()), bar: Mutex::new(None) }
    }

    fn with(&self, f: impl FnOnce(&ProgressBar)) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            f(b);
        }
    }
}

fn style(unit: Unit, known: bool) -> ProgressStyle {
    let t = match (unit, known) {
        (Unit::Bytes, true) => "{prefix:>7} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}".to_string(),
        (Unit::Items(what), true) => format!("{{prefix:>7}} [{{bar:30}}] {{pos}}/{{len}} {what} {{per_sec}} ETA {{eta}} {{msg}}"),
        (Unit::Bytes, false) => "{prefix:>7} {spinner} {binary_bytes} {binary_bytes_per_sec} {elapsed} {msg}".to_string(),
        (Unit::Items(what), false) => format!("{{prefix:>7}} {{spinner}} {{pos}} {what} {{elapsed}} {{msg}}"),
    };
    ProgressStyle::with_template(&t).expect("a valid template").progress_chars("=> ")
}

impl Progress for Bars {
    fn begin(&self, step: &'static str, total: Option<u64>, unit: Unit) {
        if !self.on {
            return;
        }
        let b = match total {
            Some(n) => ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()),
            None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
        };
        b.set_style(style(unit, total.is_some()));
        b.set_prefix(step);
        // redrawn while one long item runs (a candidate's proof, a session's creation)
        b.enable_steady_tick(Duration::from_millis(200));
        if let Some(old) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).replace(b) {
            old.finish();
        }
    }

    fn advance(&self, n: u64) {
        self.with(|b| b.inc(n));
    }

    fn note(&self, what: &str) {
        let what = what.to_string();
        self.with(|b| b.set_message(what));
    }

    fn end(&self) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let took = b.elapsed();
            b.finish_with_message(format!("done in {:.1} s", took.as_secs_f64()));
        }
    }
}
