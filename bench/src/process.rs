//! What the benches that run `medconnect` as separate processes share.

use std::path::PathBuf;

use anyhow::bail;

/// The `medconnect` binary built beside this bench.
pub fn medconnect_binary() -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name("medconnect");
    if !path.exists() {
        bail!(
            "{} not found: build it first (cargo build -p medconnect --bin medconnect)",
            path.display()
        );
    }
    Ok(path)
}

/// A port free on 127.0.0.1 a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
