#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| dagrun_fuzz::pipeline(data));
