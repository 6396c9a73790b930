//! The `medconnect` binary as a separate process: crash tests SIGKILL it, start-up tests read
//! its exit code. `scripts/test` builds it before the tests run.

use std::path::PathBuf;

use anyhow::bail;

/// Where the `medconnect` binary is: `MEDCONNECT_BIN`, or next to the test binary's `deps/`
/// folder (`target/debug/medconnect`).
pub fn medconnect_bin() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("MEDCONNECT_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let Some(profile_dir) = exe.parent().and_then(|deps| deps.parent()) else {
        bail!("cannot locate the target directory from {}", exe.display());
    };
    let bin = profile_dir.join("medconnect");
    if !bin.is_file() {
        bail!(
            "{} is missing: run `cargo build -p medconnect --bin medconnect` first (scripts/test does)",
            bin.display()
        );
    }
    Ok(bin)
}
