#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = pod_template_webhook_fuzz::template(data);
});
