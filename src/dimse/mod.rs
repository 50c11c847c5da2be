//! DIMSE in: the DICOM upper layer listener and the services it provides.
//!
//! - this file: accept loop (plain, or DICOM TLS with the TLS connection relayed by
//!   [`crate::tls::relay`]), association cap (and a cap on the rejections in progress);
//! - [`negotiation`]: what an A-ASSOCIATE-RQ is answered (called AE title check, presentation
//!   contexts and their IDs, PDU size, timeouts);
//! - [`association`]: one association's message loop (PDV reassembly, release, abort);
//! - [`command`]: command set encoding; [`message`]: multi-PDV messages and the commands that arrive
//!   while an operation runs; [`dataset`]: identifiers to and from their transfer syntax;
//! - [`echo`] and [`store`]: Verification and Storage;
//! - query/retrieve: [`qr`] (models, levels, statuses, keys -> matching engine), [`find`],
//!   [`move_`] and [`get`], with [`retrieve`] their shared C-STORE sub-operations, and [`peers`]
//!   (who may query / retrieve, where move destinations are).
//!
//! Presentation contexts are accepted for the abstract syntaxes we serve (Verification, the Storage
//! SOP classes of the standard dictionary, so the list is the dictionary's, not ours, and the
//! Patient / Study Root Q/R models), with one of our transfer syntaxes; the C-STORE handler still
//! checks the SOP class of each request (0122 otherwise), as do the Q/R handlers.

mod association;
mod audited;
pub(crate) mod command;
mod dataset;
mod echo;
mod find;
mod get;
mod message;
mod move_;
pub(crate) mod negotiation;
mod peers;
mod qr;
pub(crate) mod receive;
mod retrieve;
pub mod store;

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use dicom_ul::pdu::{
    AbortRQSource, AssociationRJ, AssociationRJResult,
    AssociationRJServiceProviderPresentationReason, AssociationRJSource,
};
use dicom_ul::Pdu;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::config::DimseConfig;
use crate::index::Index;
use crate::ingest::Ingestor;
use crate::storage::ObjectStore;
use crate::tls::Certificates;

/// Transfer syntaxes we accept on the wire (objects are stored as received).
pub const TRANSFER_SYNTAXES: &[&str] = &[
    "1.2.840.10008.1.2.1",     // Explicit VR Little Endian
    "1.2.840.10008.1.2",       // Implicit VR Little Endian
    "1.2.840.10008.1.2.2",     // Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.1.99",  // Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.5",     // RLE Lossless
    "1.2.840.10008.1.2.4.50",  // JPEG Baseline
    "1.2.840.10008.1.2.4.51",  // JPEG Extended
    "1.2.840.10008.1.2.4.57",  // JPEG Lossless
    "1.2.840.10008.1.2.4.70",  // JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  // JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  // JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  // JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  // JPEG 2000
    "1.2.840.10008.1.2.4.92",  // JPEG 2000 Part 2 Lossless
    "1.2.840.10008.1.2.4.93",  // JPEG 2000 Part 2
    "1.2.840.10008.1.2.4.201", // HTJ2K Lossless
    "1.2.840.10008.1.2.4.202", // HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203", // HTJ2K
    "1.2.840.10008.1.2.4.100", // MPEG2 MP@ML
    "1.2.840.10008.1.2.4.100.1",
    "1.2.840.10008.1.2.4.101", // MPEG2 MP@HL
    "1.2.840.10008.1.2.4.101.1",
    "1.2.840.10008.1.2.4.102", // MPEG-4 AVC/H.264 HiP@4.1
    "1.2.840.10008.1.2.4.102.1",
    "1.2.840.10008.1.2.4.103", // MPEG-4 AVC/H.264 BD-compatible
    "1.2.840.10008.1.2.4.103.1",
    "1.2.840.10008.1.2.4.104", // MPEG-4 AVC/H.264 HiP@4.2 2D
    "1.2.840.10008.1.2.4.104.1",
    "1.2.840.10008.1.2.4.105", // MPEG-4 AVC/H.264 HiP@4.2 3D
    "1.2.840.10008.1.2.4.105.1",
    "1.2.840.10008.1.2.4.106", // MPEG-4 AVC/H.264 Stereo HiP@4.2
    "1.2.840.10008.1.2.4.106.1",
    "1.2.840.10008.1.2.4.107", // HEVC/H.265 Main Profile
    "1.2.840.10008.1.2.4.108", // HEVC/H.265 Main 10 Profile
];

/// How long a new connection has to send its A-ASSOCIATE-RQ.
const ASSOCIATION_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// ARTIM timer (PS3.8 9.1.5): how long to wait for the requestor to close the connection after
/// an A-ASSOCIATE-RJ or A-ABORT before closing it ourselves.
const ARTIM_TIMEOUT: Duration = Duration::from_secs(3);

/// What every association handler shares.
pub struct Context {
    pub config: DimseConfig,
    pub ingestor: Arc<Ingestor>,
    /// Read by C-FIND (index only) and C-MOVE / C-GET (index, then storage); never written here.
    pub index: Index,
    pub store: Arc<dyn ObjectStore>,
    /// Becomes true on shutdown: associations end at their next pause between messages.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Our certificate, for C-MOVE destinations with `tls = true` (always set when there are any).
    pub tls: Option<Arc<Certificates>>,
    /// What each peer may do, on which studies (asked by C-FIND, C-MOVE, C-GET and C-STORE).
    pub policy: Arc<crate::security::policy::Policy>,
}

/// Runs a DIMSE listener until `shutdown` fires; then stops accepting (associations in progress
/// go on, each holding a permit of `slots`, which the caller waits for). With `tls`, a connection
/// is a DICOM TLS one (PS3.15 B.9 / B.11): the handshake comes first, and the client
/// certificate's subject, when one was verified, goes with the association.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<Context>,
    slots: Arc<Semaphore>,
    tls: Option<Arc<Certificates>>,
) -> anyhow::Result<()> {
    let mut shutdown = ctx.shutdown.clone();
    // A flood of connections beyond the association cap is answered A-ASSOCIATE-RJ, but each answer
    // waits for the request and then for the peer to close: past this many at once, the connection
    // is closed at once instead.
    let rejecting = Arc::new(Semaphore::new(ctx.config.max_rejections_in_progress));
    tracing::info!(
        addr = %listener.local_addr()?,
        ae_title = %ctx.config.ae_title,
        tls = tls.is_some(),
        "DIMSE listening"
    );
    loop {
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => {
                tracing::info!("DIMSE listener closed: no new associations");
                return Ok(());
            }
        };
        let _ = socket.set_nodelay(true);
        let ctx = ctx.clone();
        let tls = tls.clone();
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(async move {
                    let Some((socket, certificate)) = secure(socket, peer, tls).await else {
                        return;
                    };
                    // dicom-ul closes the socket as soon as it has sent an A-ASSOCIATE-RJ, and a
                    // requestor may then see the connection drop before it reads the rejection
                    // (pynetdicom reports an abort). A second handle keeps the connection open so
                    // that we can wait for the requestor to close it, as PS3.8 Sta13 says.
                    let linger = socket.as_fd().try_clone_to_owned().ok();
                    // A peer that connects and sends no A-ASSOCIATE-RQ must not hold a slot for the
                    // whole read timeout.
                    let request_timeout = Duration::from_secs(ctx.config.read_timeout_secs)
                        .min(ASSOCIATION_REQUEST_TIMEOUT);
                    let establishing = establish(socket, peer, &ctx, certificate.as_deref());
                    match tokio::time::timeout(request_timeout, establishing).await {
                        Ok(Ok(assoc)) => {
                            drop(linger);
                            association::run(assoc, &ctx, peer, certificate).await;
                        }
                        Ok(Err(e)) => {
                            tracing::info!(%peer, error = %e, "association not established");
                            drop(permit);
                            if let Some(socket) = linger.and_then(|fd| registered(fd).ok()) {
                                await_peer_close(socket).await;
                            }
                            return;
                        }
                        Err(_) => tracing::info!(%peer, "no association request in time"),
                    }
                    drop(permit);
                });
            }
            Err(_) => match rejecting.clone().try_acquire_owned() {
                Ok(permit) => {
                    tracing::warn!(%peer, "association limit reached, rejecting");
                    tokio::spawn(async move {
                        if let Some((socket, _)) = secure(socket, peer, tls).await {
                            reject_busy(socket, ctx.config.read_timeout_secs).await;
                        }
                        drop(permit);
                    });
                }
                Err(_) => {
                    tracing::warn!(%peer, "association and rejection limits reached, closing")
                }
            },
        }
    }
}

/// Resolves once `shutdown` is true (or its sender is gone). The watch's guard is not held across
/// an await of the caller.
pub async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// A DICOM TLS connection: the handshake (within the association request time), then the
/// connection as plain text and the verified client certificate's subject. A plain connection is
/// returned as it is. `None`: refused (not TLS, an unknown CA, an expired certificate...), logged.
async fn secure(
    socket: TcpStream,
    peer: std::net::SocketAddr,
    tls: Option<Arc<Certificates>>,
) -> Option<(TcpStream, Option<String>)> {
    let Some(tls) = tls else {
        return Some((socket, None));
    };
    let handshake = tls.dimse_acceptor().accept(socket);
    let stream = match tokio::time::timeout(ASSOCIATION_REQUEST_TIMEOUT, handshake).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            tracing::info!(%peer, "no TLS handshake in time");
            return None;
        }
    };
    let certificate = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|cert| crate::tls::subject::of(cert));
    match crate::tls::relay::relay(stream) {
        Ok(local) => Some((local, certificate)),
        Err(e) => {
            tracing::error!(%peer, error = %e, "no local socket pair for a TLS connection");
            None
        }
    }
}

/// Negotiates an association on a new connection: the request is checked first (see
/// [`negotiation`]); an invalid one is answered with A-ABORT. `certificate`: the subject of the
/// peer's TLS client certificate, checked against the certificates `[[dimse.peers]]` pin.
async fn establish(
    mut socket: TcpStream,
    peer: std::net::SocketAddr,
    ctx: &Context,
    certificate: Option<&str>,
) -> anyhow::Result<dicom_ul::association::server::AsyncServerAssociation<TcpStream>> {
    let served =
        match negotiation::peek_request(&socket, ctx.config.max_pdu_length, &ctx.config).await {
            negotiation::Proposal::Invalid(why) => {
                let abort = Pdu::AbortRQ {
                    source: AbortRQSource::ServiceUser,
                };
                let mut buf = Vec::new();
                dicom_ul::write_pdu(&mut buf, &abort)?;
                socket.write_all(&buf).await?;
                anyhow::bail!("invalid A-ASSOCIATE-RQ, aborted: {why}");
            }
            negotiation::Proposal::Acceptable(served) => served,
            negotiation::Proposal::Unread => Vec::new(),
        };
    Ok(
        negotiation::options(&ctx.config, served, Some(peer.ip()), certificate)
            .establish_async(socket)
            .await?,
    )
}

/// Answers an association request with A-ASSOCIATE-RJ (transient, local limit exceeded).
async fn reject_busy(mut socket: TcpStream, timeout_secs: u64) {
    let read_request = async {
        let mut header = [0u8; 6];
        socket.read_exact(&mut header).await?;
        let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as u64;
        if header[0] != 0x01 || len > 1 << 20 {
            return Ok::<bool, std::io::Error>(false);
        }
        tokio::io::copy(&mut (&mut socket).take(len), &mut tokio::io::sink()).await?;
        Ok(true)
    };
    let timeout = Duration::from_secs(timeout_secs).min(ASSOCIATION_REQUEST_TIMEOUT);
    let Ok(Ok(true)) = tokio::time::timeout(timeout, read_request).await else {
        return;
    };
    let rj = Pdu::AssociationRJ(AssociationRJ {
        result: AssociationRJResult::Transient,
        source: AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        ),
    });
    let mut buf = Vec::new();
    if dicom_ul::write_pdu(&mut buf, &rj).is_ok() && socket.write_all(&buf).await.is_ok() {
        await_peer_close(socket).await;
    }
}

/// The duplicated descriptor of a connection as a tokio socket (registered with the runtime only
/// when it is needed: after a rejection).
fn registered(fd: std::os::fd::OwnedFd) -> std::io::Result<TcpStream> {
    let socket = std::net::TcpStream::from(fd);
    socket.set_nonblocking(true)?;
    TcpStream::from_std(socket)
}

/// Waits, at most the ARTIM time, for the requestor to close the connection, discarding whatever
/// it still sends; then closes our side.
async fn await_peer_close(mut socket: TcpStream) {
    let mut sink = tokio::io::sink();
    let _ = tokio::time::timeout(ARTIM_TIMEOUT, tokio::io::copy(&mut socket, &mut sink)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_transfer_syntax_can_be_negotiated() {
        // dicom-ul only accepts syntaxes its registry supports: deflate needs a crate feature.
        for ts in TRANSFER_SYNTAXES {
            assert!(
                dicom_ul::association::server::is_supported(ts),
                "{ts} would be refused in negotiation"
            );
        }
    }
}
