#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (moat_fuzz::target("firmware_multiboot").expect("listed in TARGETS"))(data);
});
