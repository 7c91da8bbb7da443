fn main() -> anyhow::Result<()> {
    pod_template_webhook::cli::run()
}
