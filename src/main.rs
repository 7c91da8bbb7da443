// glibc malloc was a third of the admission path's instructions (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if let Err(e) = pod_template_webhook::commands::run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
