//! TLS connections handed to code that only speaks to a `tokio::net::TcpStream` (dicom-ul).
//!
//! dicom-ul negotiates server associations on a `TcpStream` only (its own TLS option does the
//! handshake and the A-ASSOCIATE-RQ in one call, so the certificate could not be checked against
//! the calling AE title, nor the request looked at before negotiation as [`crate::dimse`] does),
//! and opens client associations only by connecting to an address itself. So:
//!
//! - [`relay`]: an accepted TLS connection is decrypted here and relayed over a local socket pair,
//!   whose other end the DIMSE code reads as it reads a plain connection;
//! - [`outgoing`]: a loopback listener takes dicom-ul's one connection and relays it over TLS to
//!   the peer.
//!
//! Only TLS connections pay for the relay (one more copy of each byte); plain ones are untouched.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;

/// Bytes moved per read in each direction (a DIMSE PDU is typically 16-64 KiB).
const CHUNK: usize = 64 * 1024;

/// Once the local side has closed, how long the peer has to close its side before the TLS
/// connection is dropped (PS3.8's ARTIM time).
const PEER_CLOSE: Duration = Duration::from_secs(3);

/// Starts relaying `tls` and returns the local end to use as its plain-text connection.
pub fn relay<S>(tls: S) -> std::io::Result<TcpStream>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    theirs.set_nonblocking(true)?;
    // A stream socket read and written as a TcpStream: the TCP-only options the DIMSE code sets
    // (TCP_NODELAY, TCP_QUICKACK) fail on it, which that code already ignores.
    let local = TcpStream::from_std(std::net::TcpStream::from(OwnedFd::from(ours)))?;
    let inner = tokio::net::UnixStream::from_std(theirs)?;
    tokio::spawn(pipe(tls, inner));
    Ok(local)
}

/// A loopback address for dicom-ul to connect to: its connection (the first one accepted) is
/// relayed over TLS to `host:port`, whose certificate must be valid for `host`. The receiver gets
/// the address the accepted connection came from, for the caller to check it was its own.
pub async fn outgoing(
    connector: TlsConnector,
    host: String,
    port: u16,
    timeout: Duration,
) -> std::io::Result<(SocketAddr, oneshot::Receiver<SocketAddr>)> {
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
    let local = listener.local_addr()?;
    let name = ServerName::try_from(host.clone())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let (accepted_from, accepted) = oneshot::channel();
    tokio::spawn(async move {
        let connect = async {
            let (plain, from) = listener.accept().await?;
            drop(listener);
            let _ = accepted_from.send(from);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>((plain, tls))
        };
        match tokio::time::timeout(timeout, connect).await {
            Ok(Ok((plain, tls))) => pipe(tls, plain).await,
            Ok(Err(e)) => {
                tracing::warn!(%host, port, error = %e, "TLS connection to a peer failed")
            }
            Err(_) => tracing::warn!(%host, port, "TLS connection to a peer timed out"),
        }
    });
    Ok((local, accepted))
}

/// Moves bytes between the TLS side and the plain side until both are closed, or until the plain
/// side has closed and the peer did not follow within [`PEER_CLOSE`].
async fn pipe<T, P>(tls: T, plain: P)
where
    T: AsyncRead + AsyncWrite,
    P: AsyncRead + AsyncWrite,
{
    let (tls_read, mut tls_write) = tokio::io::split(tls);
    let (plain_read, mut plain_write) = tokio::io::split(plain);
    let incoming = async {
        let mut from = BufReader::with_capacity(CHUNK, tls_read);
        let _ = tokio::io::copy_buf(&mut from, &mut plain_write).await;
        let _ = plain_write.shutdown().await;
    };
    let outgoing = async {
        let mut from = BufReader::with_capacity(CHUNK, plain_read);
        let _ = tokio::io::copy_buf(&mut from, &mut tls_write).await;
        // close_notify, then the TCP FIN.
        let _ = tls_write.shutdown().await;
    };
    tokio::pin!(incoming, outgoing);
    tokio::select! {
        _ = &mut outgoing => {
            let _ = tokio::time::timeout(PEER_CLOSE, incoming).await;
        }
        _ = &mut incoming => outgoing.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn bytes_go_both_ways_and_a_close_is_passed_on() {
        let (remote, near) = tokio::io::duplex(1024);
        let mut local = relay(near).unwrap();
        let (mut remote_read, mut remote_write) = tokio::io::split(remote);
        remote_write.write_all(b"A-ASSOCIATE-RQ").await.unwrap();
        let mut got = [0u8; 14];
        local.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"A-ASSOCIATE-RQ");
        local.write_all(b"AC").await.unwrap();
        local.shutdown().await.unwrap();
        let mut back = Vec::new();
        remote_read.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"AC");
        drop(remote_write);
        assert_eq!(local.read(&mut got).await.unwrap(), 0);
    }
}
