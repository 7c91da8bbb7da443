//! Replays the fuzz seed corpus through the fuzz targets' checks on stable Rust, so every test
//! run exercises them; `cargo +nightly fuzz run <target>` explores further (see fuzz/README.md).

#[path = "../fuzz/src/checks.rs"]
mod checks;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        check(&std::fs::read(entry.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n > 0, "no seeds in {}", dir.display());
}

#[test]
fn review_corpus() {
    replay("review", checks::review);
}

#[test]
fn template_corpus() {
    replay("template", checks::template);
}

#[test]
fn merge_patch_corpus() {
    replay("merge_patch", checks::merge_patch);
}
