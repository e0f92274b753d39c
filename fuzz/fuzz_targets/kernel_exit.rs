#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (moat_fuzz::target("kernel_exit").expect("listed in TARGETS"))(data);
});
