//! Replays the fuzz seed corpus through the fuzz targets' checks on stable Rust, so every test
//! run exercises them; `cargo +nightly fuzz run <target>` explores further (see fuzz/README.md).

#[path = "../fuzz/src/checks.rs"]
mod checks;

/// Runs every seed of `target` through `check`, which says whether its oracle compared anything
/// (a seed refused at the door is checked for not panicking only). At least `min_checked` of the
/// seeds must reach the oracle, so that a check that silently stops comparing fails here.
/// The share of seeds that must reach each target's oracle (the others are the malformed inputs
/// the corpus keeps on purpose).
const MIN_CHECKED: f64 = 0.3;

fn replay(target: &str, check: fn(&[u8]) -> bool, min_checked: f64) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let (mut seeds, mut checked) = (0, 0);
    for entry in std::fs::read_dir(&dir).unwrap() {
        checked += usize::from(check(&std::fs::read(entry.unwrap().path()).unwrap()));
        seeds += 1;
    }
    assert!(seeds > 0, "no seeds in {}", dir.display());
    eprintln!("{target}: {checked} of {seeds} seeds reached the oracle");
    assert!(
        checked as f64 >= min_checked * seeds as f64,
        "{target}: only {checked} of {seeds} seeds reached the oracle"
    );
}

#[test]
fn review_corpus() {
    replay("review", checks::review, MIN_CHECKED);
}

#[test]
fn template_corpus() {
    replay("template", checks::template, MIN_CHECKED);
}

#[test]
fn merge_patch_corpus() {
    replay("merge_patch", checks::merge_patch, MIN_CHECKED);
}
