fn main() {
    if let Err(e) = pod_template_webhook::cli::run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
