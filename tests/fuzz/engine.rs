//! A time-bounded fuzzer built on proptest, for the parsers that read what remote peers and
//! users send. `cargo fuzz` needs a nightly toolchain CI does not have; this runs as ordinary
//! tests in `./scripts/test`.
//!
//! Each target starts by running every entry of its seed corpus (`tests/fuzz/corpus/<target>/`,
//! kept in the repository: regressions stay fixed), then runs inputs until its time is up:
//! corpus entries mutated (bit flips, byte sets, insertions, deletions, truncation, splices
//! with other entries, duplicated ranges, dictionary tokens), inputs generated from the
//! target's dictionary, and random bytes. A failing input (a panic, a broken property, a case
//! slower than `CASE_TIMEOUT_MS`) is shrunk by proptest, written to
//! `$MEDCONNECT_CACHE/fuzz/failures/<target>-<hash>` and reported with its bytes escaped.
//!
//! `MEDCONNECT_FUZZ_SECONDS` (default 3) sets each target's time; `MEDCONNECT_FUZZ_SEED`
//! (hex) replays a run. Each target prints its executions (`--nocapture` shows them;
//! `scripts/fuzz` runs every target that way).
//!
//! Shared by several crates' tests through `#[path]` (it is no crate of its own, so no crate
//! has to depend on another's test code).

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};

/// Seconds per target when `MEDCONNECT_FUZZ_SECONDS` is not set: a few, so the whole suite
/// stays well under a minute in CI.
pub const DEFAULT_SECONDS: f64 = 3.0;
/// One input taking longer than this is a failure (an accidental quadratic loop is a denial of
/// service). Generous: CI machines are shared.
pub const CASE_TIMEOUT_MS: u32 = 5_000;

/// The time each target runs.
pub fn budget() -> Duration {
    let seconds = std::env::var("MEDCONNECT_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(DEFAULT_SECONDS);
    Duration::from_secs_f64(seconds)
}

/// `tests/fuzz/corpus/<target>` of the repository.
pub fn corpus_dir(manifest_dir: &str, target: &str) -> PathBuf {
    let mut dir = PathBuf::from(manifest_dir);
    // Every crate that includes the engine sits below the repository root.
    while !dir.join("tests/fuzz/corpus").is_dir() {
        if !dir.pop() {
            panic!("no tests/fuzz/corpus above {manifest_dir}");
        }
    }
    dir.join("tests/fuzz/corpus").join(target)
}

/// Every file of a corpus directory, in name order (a missing directory is an empty corpus).
pub fn load_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
        .into_iter()
        .filter(|p| p.is_file())
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

/// What a target is fed.
pub struct Target {
    pub name: &'static str,
    /// Seed inputs: the repository corpus plus any the test adds in code.
    pub corpus: Vec<Vec<u8>>,
    /// Tokens the target's format is made of (delimiters, keywords), for generation and
    /// insertion.
    pub dictionary: Vec<Vec<u8>>,
    /// Inputs are cut to this length.
    pub max_len: usize,
}

impl Target {
    pub fn new(name: &'static str, manifest_dir: &str) -> Self {
        Self {
            name,
            corpus: load_corpus(&corpus_dir(manifest_dir, name)),
            dictionary: Vec::new(),
            max_len: 64 * 1024,
        }
    }

    pub fn seed(mut self, input: impl AsRef<[u8]>) -> Self {
        self.corpus.push(input.as_ref().to_vec());
        self
    }

    pub fn tokens<T: AsRef<[u8]>>(mut self, tokens: impl IntoIterator<Item = T>) -> Self {
        self.dictionary
            .extend(tokens.into_iter().map(|t| t.as_ref().to_vec()));
        self
    }

    pub fn max_len(mut self, max_len: usize) -> Self {
        self.max_len = max_len;
        self
    }
}

/// One mutation of a corpus entry. Positions are proportional (`Index`), so they shrink well
/// and fit inputs of any length.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    Truncate(Index),
    Splice(Index, Index, Index, usize),
    Duplicate(Index, usize),
    Token(Index, Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit(at, bit)),
        (any::<Index>(), any::<u8>()).prop_map(|(at, b)| Mutation::SetByte(at, b)),
        (
            any::<Index>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(at, bytes)| Mutation::Insert(at, bytes)),
        (any::<Index>(), 1usize..64).prop_map(|(at, n)| Mutation::Delete(at, n)),
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), any::<Index>(), any::<Index>(), 1usize..256)
            .prop_map(|(at, other, from, n)| Mutation::Splice(at, other, from, n)),
        (any::<Index>(), 1usize..256).prop_map(|(at, n)| Mutation::Duplicate(at, n)),
        (any::<Index>(), any::<Index>()).prop_map(|(at, token)| Mutation::Token(at, token)),
    ]
}

fn position(at: &Index, len: usize) -> usize {
    // `Index::index` needs a non-zero size; position `len` (the end) is allowed.
    at.index(len + 1)
}

fn apply(
    mut input: Vec<u8>,
    mutation: &Mutation,
    corpus: &[Vec<u8>],
    dictionary: &[Vec<u8>],
) -> Vec<u8> {
    match mutation {
        Mutation::FlipBit(at, bit) if !input.is_empty() => {
            let i = at.index(input.len());
            input[i] ^= 1 << bit;
        }
        Mutation::SetByte(at, byte) if !input.is_empty() => {
            let i = at.index(input.len());
            input[i] = *byte;
        }
        Mutation::Insert(at, bytes) => {
            let i = position(at, input.len());
            input.splice(i..i, bytes.iter().copied());
        }
        Mutation::Delete(at, n) if !input.is_empty() => {
            let i = at.index(input.len());
            let end = (i + n).min(input.len());
            input.drain(i..end);
        }
        Mutation::Truncate(at) => {
            let i = position(at, input.len());
            input.truncate(i);
        }
        Mutation::Splice(at, other, from, n) if !corpus.is_empty() => {
            let other = &corpus[other.index(corpus.len())];
            let start = position(from, other.len());
            let end = (start + n).min(other.len());
            let i = position(at, input.len());
            input.splice(i..i, other[start..end].iter().copied());
        }
        Mutation::Duplicate(at, n) if !input.is_empty() => {
            let start = at.index(input.len());
            let end = (start + n).min(input.len());
            let copy = input[start..end].to_vec();
            input.splice(end..end, copy);
        }
        Mutation::Token(at, token) if !dictionary.is_empty() => {
            let token = &dictionary[token.index(dictionary.len())];
            let i = position(at, input.len());
            input.splice(i..i, token.iter().copied());
        }
        _ => {}
    }
    input
}

/// Mutated corpus entries, generated token streams, and random bytes.
fn inputs(target: &Target) -> BoxedStrategy<Vec<u8>> {
    let corpus = Arc::new(target.corpus.clone());
    let dictionary = Arc::new(target.dictionary.clone());
    let max = target.max_len;
    let random = proptest::collection::vec(any::<u8>(), 0..max.clamp(1, 4096));
    let mut tokens: Vec<BoxedStrategy<Vec<u8>>> = dictionary
        .iter()
        .cloned()
        .map(|t| Just(t).boxed())
        .collect();
    tokens.push(proptest::collection::vec(any::<u8>(), 0..8).boxed());
    let generated = proptest::collection::vec(proptest::strategy::Union::new(tokens), 0..64)
        .prop_map(move |parts| {
            let mut out = parts.concat();
            out.truncate(max);
            out
        });
    if corpus.is_empty() {
        return prop_oneof![2 => generated, 1 => random].boxed();
    }
    let mutated = (0..corpus.len(), proptest::collection::vec(mutation(), 1..8)).prop_map(
        move |(i, mutations)| {
            let mut input = corpus[i].clone();
            for m in &mutations {
                input = apply(input, m, &corpus, &dictionary);
            }
            input.truncate(max);
            input
        },
    );
    prop_oneof![6 => mutated, 3 => generated, 1 => random].boxed()
}

/// What a run did.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub executions: u64,
    pub elapsed: Duration,
}

fn escaped(input: &[u8]) -> String {
    input.escape_ascii().to_string()
}

fn save_failure(target: &str, input: &[u8]) -> Option<PathBuf> {
    use std::hash::{Hash, Hasher};
    let cache = std::env::var_os("MEDCONNECT_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/medconnect")))?;
    let dir = cache.join("fuzz/failures");
    std::fs::create_dir_all(&dir).ok()?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    input.hash(&mut hasher);
    let path = dir.join(format!("{target}-{:016x}", hasher.finish()));
    std::fs::write(&path, input).ok()?;
    Some(path)
}

fn seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    match std::env::var("MEDCONNECT_FUZZ_SEED") {
        Ok(hex) => {
            for (i, byte) in seed.iter_mut().enumerate() {
                *byte = hex
                    .get(i * 2..i * 2 + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .unwrap_or(0);
            }
        }
        Err(_) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            seed[..16].copy_from_slice(&nanos.to_le_bytes());
            seed[16..24].copy_from_slice(&u64::from(std::process::id()).to_le_bytes());
        }
    }
    seed
}

/// Runs `check` on every corpus entry, then on fuzzed inputs until the time is up. Panics
/// (failing the test) with the shrunk input on the first failure.
pub fn run(target: Target, check: impl Fn(&[u8]) -> Result<(), TestCaseError>) -> Report {
    let started = Instant::now();
    let mut executions = 0u64;
    for (n, input) in target.corpus.iter().enumerate() {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(input)));
        executions += 1;
        let failure = match outcome {
            Ok(Ok(())) | Ok(Err(TestCaseError::Reject(_))) => None,
            Ok(Err(TestCaseError::Fail(why))) => Some(why.to_string()),
            Err(_) => Some("panicked".to_string()),
        };
        if let Some(why) = failure {
            panic!(
                "fuzz target {}: corpus entry {n} fails: {why}\ninput: b\"{}\"",
                target.name,
                escaped(input)
            );
        }
    }
    let seed = seed();
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    let config = Config {
        timeout: CASE_TIMEOUT_MS,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
    let strategy = inputs(&target);
    let deadline = started + budget();
    while Instant::now() < deadline {
        let tree = match strategy.new_tree(&mut runner) {
            Ok(tree) => tree,
            Err(reason) => panic!("fuzz target {}: no input: {reason}", target.name),
        };
        executions += 1;
        match runner.run_one(tree, |input| check(&input)) {
            Ok(_) => {}
            Err(TestError::Fail(why, input)) => {
                let saved = save_failure(target.name, &input)
                    .map_or_else(String::new, |p| format!("\nsaved to {}", p.display()));
                panic!(
                    "fuzz target {} failed after {executions} executions (MEDCONNECT_FUZZ_SEED={hex}): {why}\nshrunk input ({} bytes): b\"{}\"{saved}\nfix it and add the input to tests/fuzz/corpus/{}/",
                    target.name,
                    input.len(),
                    escaped(&input),
                    target.name
                );
            }
            Err(TestError::Abort(why)) => panic!("fuzz target {}: aborted: {why}", target.name),
        }
    }
    let report = Report {
        executions,
        elapsed: started.elapsed(),
    };
    println!(
        "fuzz {}: {} executions in {:.1} s ({} corpus entries, seed {hex}), no failure",
        target.name,
        report.executions,
        report.elapsed.as_secs_f64(),
        target.corpus.len()
    );
    report
}

/// An allocator that counts what the current thread allocates, so a target can bound the
/// memory one input makes it take. Install it with
/// `#[global_allocator] static ALLOC: Counting = Counting;` in a test binary.
pub struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(size);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn note_free(size: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(size)));
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters change.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_free(layout.size());
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_free(layout.size());
        note_alloc(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// The most the current thread had allocated at once (beyond what it held before) while `f`
/// ran, with `f`'s result. Meaningful only with [`Counting`] installed.
pub fn peak_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(before));
    let result = f();
    let peak = PEAK.with(Cell::get);
    (result, peak.saturating_sub(before))
}
