// glibc malloc was a third of the admission path's instructions (docs/performance.md).
// Built without transparent huge pages (the `no_thp` feature): with them, RSS was 8-11 MB higher
// for the same live memory (19 vs 11 MB idle; README, Monitoring).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if let Err(e) = pod_template_webhook::commands::run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
