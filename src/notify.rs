//! systemd's notify protocol: `READY=1`, `STATUS=…`, `WATCHDOG=1`, `STOPPING=1`
//! as datagrams to `$NOTIFY_SOCKET`. Without that variable every call is a no-op.

use std::os::unix::net::UnixDatagram;

/// Sends one notification; failures are logged once at debug level and ignored,
/// since systemd integration must never stop replication.
pub fn notify(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let result = (|| -> std::io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket name.
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(message.as_bytes(), &address)?;
        } else {
            socket.send_to(message.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::debug!("sd_notify {message:?} failed: {e}");
    }
}
