#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (moat_fuzz::target("net_switch").expect("listed in TARGETS"))(data);
});
