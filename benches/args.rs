//! The benchmark binaries' `--name VALUE` flags (no parser crate for two
//! binaries of loops).

/// The value after `name` on the command line, if any.
pub fn str_arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

/// The number after `name`, or `default`.
pub fn arg(name: &str, default: u64) -> u64 {
    str_arg(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
