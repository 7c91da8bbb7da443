//! A small driver for instruction-level profiling of the admission path (docs/performance.md):
//!
//!   cargo bench --bench profile_driver --no-run        # prints the binary's path
//!   valgrind --tool=callgrind --callgrind-out-file=cg.out target/release/deps/profile_driver-HASH flyte 2000
//!   callgrind_annotate --inclusive=yes cg.out | head -60
//!
//! Arguments: the input (`flyte`, `gpu`, `env1500`, `log`, `metrics`, `layers`, `task-name`, `rule3-off`) and
//! an iteration count. `task-name` is the flyte review as Flyte 2 creates the pod (no environment
//! label; `flyte.org/managed` and `task-name: hello_world.train`, SPEC §9); `rule3-off` is the
//! flyte review with the task-name rule turned off (`--task-name-label ""`).
//! `layers` is the flyte review with three layers (a platform default, a namespace default,
//! `hello_world`; SPEC §8), to compare with `flyte` (one layer). `flyte`, `gpu`
//! and `env1500` run `parse_review` + `mutate` + `response_body` as the server does (no HTTP, no
//! log line). `log` runs the flyte path and also emits the server's per-admission line
//! (`server::log_decision`, at `debug` for a mutation, enabled here) through a `tracing_subscriber`
//! fmt layer writing to a sink, to count what the line costs when it is on. `metrics` runs the
//! flyte path and also the handler's per-template counting (`Metrics::count_templates`).
//! Under `cargo bench` (an argument `--bench`), it runs each input a few times and exits.

mod shared;

use pod_template_webhook::admission;
use shared::{admit, input, policy, store};

// The allocator the server uses (src/main.rs), so the figures are the server's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn run(name: &str, iterations: usize) -> usize {
    let metrics = pod_template_webhook::metrics::Metrics::default();
    let input_name = if name == "metrics" { "flyte" } else { name };
    let (store, policy, body) = (store(), policy(input_name), input(input_name));
    let mut bytes = 0;
    for _ in 0..iterations {
        let started = std::time::Instant::now();
        let decision = admit(&body, &store, &policy);
        bytes += admission::response_body(&decision).len();
        if name == "metrics" {
            metrics.count_templates(&decision);
        }
        if name == "log" {
            pod_template_webhook::server::log_decision(&decision, started.elapsed());
        }
    }
    bytes
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--bench" || a == "--test") || args.is_empty() {
        for name in ["flyte", "gpu", "env1500", "layers", "task-name", "rule3-off"] {
            std::hint::black_box(run(name, 3));
        }
        return;
    }
    if args[0] == "log" {
        // As the server logs (text format, EnvFilter at info), into a sink instead of stderr.
        tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .init();
    }
    let iterations = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(1000);
    let bytes = run(&args[0], iterations);
    eprintln!("{} x {iterations}: {bytes} response bytes", args[0]);
}
