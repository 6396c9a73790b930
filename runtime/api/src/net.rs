//! Listening sockets for listener sources (MLLP, the MQTT listener).

use tokio::net::{TcpListener, TcpSocket};

/// Pending connections the kernel queues for a listener before it accepts them.
const BACKLOG: u32 = 1024;

/// Binds `host:port` and listens. With `share_port`, the socket takes `SO_REUSEPORT`, so the
/// listeners of every-worker connectors on several workers of one host can all bind the same
/// port and the kernel spreads new connections over them (Linux lets only sockets of the same
/// user share a port). `SO_REUSEADDR` is always set, as servers do, so a restarted listener
/// does not wait out connections in TIME_WAIT.
pub async fn listen(host: &str, port: u16, share_port: bool) -> std::io::Result<TcpListener> {
    let mut last = None;
    for address in tokio::net::lookup_host((host, port)).await? {
        let socket = if address.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        #[cfg(unix)]
        if share_port {
            socket.set_reuseport(true)?;
        }
        #[cfg(not(unix))]
        let _ = share_port;
        match socket.bind(address).and_then(|()| socket.listen(BACKLOG)) {
            Ok(listener) => return Ok(listener),
            Err(error) => last = Some(error),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            format!("{host} resolves to no address"),
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_shared_port_takes_a_second_listener_and_an_unshared_one_does_not() {
        let first = listen("127.0.0.1", 0, true).await.expect("first");
        let port = first.local_addr().expect("address").port();
        let second = listen("127.0.0.1", port, true).await;
        assert!(second.is_ok(), "{second:?}");
        let exclusive = listen("127.0.0.1", 0, false).await.expect("exclusive");
        let port = exclusive.local_addr().expect("address").port();
        let err = listen("127.0.0.1", port, false)
            .await
            .expect_err("port taken");
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    }
}
