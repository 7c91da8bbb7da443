//! Heap use, counted by a counting allocator around the server's (mimalloc):
//!
//!   cargo bench --bench allocs
//!
//! - allocations and bytes allocated per admission (parse + mutate + response body, as
//!   `profile_driver` runs it) for each input;
//! - the heap a parsed template keeps: 10,000 realistic templates (1,000 tenants × 10 keys, the
//!   cluster-scale benchmark's) applied to a catalog and indexed, live bytes per template.

use std::alloc::{GlobalAlloc, Layout};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

#[path = "shared/realistic.rs"]
mod realistic;
mod shared;

use pod_template_webhook::admission;
use pod_template_webhook::store::Catalog;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
static ALLOCATED: AtomicUsize = AtomicUsize::new(0);
static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        ALLOCATED.fetch_add(layout.size(), Relaxed);
        LIVE.fetch_add(layout.size(), Relaxed);
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        ALLOCATED.fetch_add(new_size, Relaxed);
        LIVE.fetch_add(new_size, Relaxed);
        LIVE.fetch_sub(layout.size(), Relaxed);
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// (allocations, bytes allocated) while `f` runs.
fn counted<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    let (a, b) = (ALLOCATIONS.load(Relaxed), ALLOCATED.load(Relaxed));
    let out = f();
    (out, ALLOCATIONS.load(Relaxed) - a, ALLOCATED.load(Relaxed) - b)
}

fn per_admission() {
    const N: usize = 200;
    let store = shared::store();
    println!("{:<10} {:>12} {:>16}", "input", "allocations", "bytes allocated");
    for name in ["flyte", "task-name", "gpu", "layers", "env1500"] {
        let (policy, body) = (shared::policy(name), shared::input(name));
        // Warm: lazily built statics (metrics names, regexes) are not the admission's.
        admission::response_body(&shared::admit(&body, &store, &policy));
        let ((), allocations, bytes) = counted(|| {
            for _ in 0..N {
                let decision = shared::admit(&body, &store, &policy);
                std::hint::black_box(admission::response_body(&decision));
            }
        });
        println!("{name:<10} {:>12.1} {:>16.0}", allocations as f64 / N as f64, bytes as f64 / N as f64);
    }
}

fn footprint() {
    const TENANTS: usize = 1000;
    const KEYS: usize = 10;
    let sources: Vec<BTreeMap<String, String>> = (0..TENANTS)
        .map(|t| (0..KEYS).map(|k| (format!("env-{k}"), realistic::realistic_template(t, k))).collect())
        .collect();
    let text: usize = sources.iter().flat_map(|s| s.values()).map(String::len).sum();
    let before = LIVE.load(Relaxed);
    let mut catalog = Catalog::new("flyte");
    for (t, data) in sources.iter().enumerate() {
        assert!(catalog.apply(&format!("team-{t}"), "templates", Some("1"), data).is_empty());
    }
    let index = catalog.index();
    drop(sources);
    let live = LIVE.load(Relaxed).saturating_sub(before);
    let n = TENANTS * KEYS;
    println!(
        "footprint: {n} templates ({} bytes of YAML each on average) keep {:.1} MB live: {} bytes per template (catalog + index)",
        text / n,
        live as f64 / 1e6,
        live / n
    );
    std::hint::black_box((&catalog, &index));
}

fn main() {
    per_admission();
    footprint();
}
