#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (moat_fuzz::target("virtio_rng").expect("listed in TARGETS"))(data);
});
