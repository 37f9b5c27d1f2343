//! The config parser and validator on arbitrary text: every input is
//! either a config or a list of diagnostics, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        match veer_control::config::Config::parse(text, std::path::Path::new("/nonexistent/veer")) {
            Ok(c) => assert!(!c.routes.is_empty(), "a config without routes was accepted"),
            Err(d) => assert!(!d.to_string().is_empty(), "a rejection without a message"),
        }
    }
});
