#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (moat_fuzz::target("pit").expect("listed in TARGETS"))(data);
});
