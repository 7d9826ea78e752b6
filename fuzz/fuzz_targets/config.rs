#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vidllm_tests::fuzz::config(data));
