//! Progress of the long steps (load, match, prove, save, verify), reported to whoever shows it.
//! The library only counts; the CLI draws (`cli::progress`, with indicatif), and library callers
//! that pass nothing get [`Silent`].

/// What a step counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Bytes,
    /// things of this name (plural): "rules", "candidates", "runs"
    Items(&'static str),
}

/// Receives the progress of one step at a time: `begin`, any number of `advance`, `end`.
pub trait Progress: Sync {
    /// A step starts; `total` is how much it will count, when known.
    fn begin(&self, step: &'static str, total: Option<u64>, unit: Unit);
    /// `n` more of the step's unit are done.
    fn advance(&self, n: u64);
    /// What the step is doing now (a candidate's name, a token count), shown beside the count.
    fn note(&self, _what: &str) {}
    /// The step is over.
    fn end(&self);
}

/// Shows nothing.
pub struct Silent;

impl Progress for Silent {
    fn begin(&self, _: &'static str, _: Option<u64>, _: Unit) {}
    fn advance(&self, _: u64) {}
    fn end(&self) {}
}
