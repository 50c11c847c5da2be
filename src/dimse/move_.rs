//! C-MOVE SCP (PS3.4 C.4.2): the instances an identifier names are sent as C-STORE
//! sub-operations over a new association to the Move Destination, which must be a configured peer
//! (`[[dimse.peers]]`, otherwise A801). A pending response reports the counts after each
//! sub-operation; a C-CANCEL on the requesting association stops before the next one.

use std::time::Duration;

use anyhow::Context as _;
use dicom_ul::association::client::AsyncClientAssociation;
use dicom_ul::association::server::AsyncServerAssociation;
use dicom_ul::pdu::PresentationContextResultReason;
use dicom_ul::ClientAssociationOptions;
use tokio::net::TcpStream;

use crate::config::PeerConfig;

use super::audited;
use super::command::{elem, field};
use super::message::{self, Inbox, ProtocolError};
use super::peers::{self, Right};
use super::qr::{status, Failure, Model, Request};
use super::retrieve::{self, Originator, OutContext, Progress, SubOpError};
use super::Context;
use crate::audit::{Action, Outcome};

/// How long connecting to and associating with a Move Destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(
    assoc: &mut AsyncServerAssociation<TcpStream>,
    ctx: &Context,
    req: Request,
    model: Model,
) -> Result<(), ProtocolError> {
    let rsp = field::C_MOVE_RSP;
    let peers = &ctx.config.peers;
    if !peers::allowed(peers, &req.calling_ae, req.peer.ip(), Right::Retrieve) {
        audited::record(ctx, &req, Action::PolicyDenial, Outcome::MinorFailure, 0);
        let f = Failure::new(
            status::NOT_AUTHORIZED,
            "calling AE title is not allowed to retrieve",
        );
        return retrieve::send_refusal(assoc, &req, rsp, &f).await;
    }
    let destination_ae = req.cmd.string(elem::MOVE_DESTINATION).unwrap_or_default();
    let Some(destination) = peers::destination(peers, &destination_ae) else {
        let f = Failure::new(
            status::MOVE_DESTINATION_UNKNOWN,
            format!("move destination {destination_ae:?} is not a configured peer"),
        );
        return retrieve::send_refusal(assoc, &req, rsp, &f).await;
    };
    let instances = match retrieve::resolve(ctx, &req, model).await {
        Ok(list) => list,
        Err(f) => return retrieve::send_refusal(assoc, &req, rsp, &f).await,
    };
    audited::record(
        ctx,
        &req,
        Action::Retrieve,
        Outcome::Success,
        instances.len(),
    );
    let mut progress = Progress::new(instances.len());
    if instances.is_empty() {
        return progress.send_final(assoc, &req, rsp, None).await;
    }

    let mut options = ClientAssociationOptions::new()
        .calling_ae_title(ctx.config.ae_title.clone())
        .called_ae_title(destination.ae_title.trim().to_string())
        .max_pdu_length(ctx.config.max_pdu_length)
        .read_timeout(Duration::from_secs(ctx.config.read_timeout_secs))
        .write_timeout(ctx.config.write_timeout())
        .connection_timeout(CONNECT_TIMEOUT);
    for (abstract_syntax, transfer_syntaxes) in retrieve::proposed_contexts(&instances) {
        options = options.with_presentation_context(abstract_syntax, transfer_syntaxes);
    }
    let established =
        tokio::time::timeout(CONNECT_TIMEOUT * 2, connect(ctx, destination, options)).await;
    let mut sub = match established {
        Ok(Ok(sub)) => sub,
        Ok(Err(e)) => {
            return unreachable_destination(assoc, &req, progress, &instances, &e.to_string()).await
        }
        Err(_) => {
            return unreachable_destination(assoc, &req, progress, &instances, "timed out").await
        }
    };
    // Without TCP_NODELAY each C-STORE's last PDU waits for the destination's delayed ACK.
    let _ = sub.inner_stream().set_nodelay(true);
    let contexts: Vec<OutContext> = sub
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .map(|pc| OutContext {
            id: pc.id,
            abstract_syntax: pc.abstract_syntax.trim_end_matches('\0').to_string(),
            transfer_syntax: pc.transfer_syntax.trim_end_matches('\0').to_string(),
        })
        .collect();

    let originator = Originator {
        ae_title: &req.calling_ae,
        message_id: req.message_id(),
    };
    let pending_interval = Duration::from_millis(ctx.config.retrieve_pending_interval_ms);
    let mut requester_inbox = Inbox::default();
    let mut sub_inbox = Inbox::default();
    let mut sub_alive = true;
    let mut read_ahead =
        retrieve::ReadAhead::new(ctx, &contexts, message::pdv_limit(&sub), &instances);
    for (n, inst) in instances.iter().enumerate() {
        // The requester gone or broken: the destination association is aborted with it.
        match message::cancel_requested(assoc, &mut requester_inbox, req.message_id()).await {
            Ok(false) => {}
            Ok(true) => {
                progress.cancelled = true;
                break;
            }
            Err(e) => {
                let _ = sub.abort().await;
                return Err(e);
            }
        }
        let message_id = (n % 0xFFFF) as u16 + 1;
        let outcome = match read_ahead.take().await {
            Ok(prepared) => {
                retrieve::store(
                    &mut sub,
                    &mut sub_inbox,
                    ctx,
                    inst,
                    prepared,
                    message_id,
                    Some(&originator),
                    &mut progress,
                    None,
                )
                .await
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(store_status) => progress.record(inst, Some(store_status)),
            Err(SubOpError::Failed(why)) => {
                tracing::warn!(sop_instance_uid = %inst.sop_instance_uid, error = %why, "C-MOVE sub-operation failed");
                progress.record(inst, None);
            }
            Err(SubOpError::Protocol(e)) => {
                tracing::warn!(destination = %destination_ae, error = %e, "C-MOVE destination association lost");
                progress.fail_rest(&instances[n..]);
                sub_alive = false;
                break;
            }
        }
        if progress.pending_due(pending_interval) {
            if let Err(e) = progress.send_pending(assoc, &req, rsp).await {
                let _ = sub.abort().await;
                return Err(e);
            }
        }
    }
    if sub_alive {
        let _ = tokio::time::timeout(CONNECT_TIMEOUT, sub.release()).await;
    } else {
        let _ = sub.abort().await;
    }
    tracing::info!(destination = %destination_ae, completed = progress.completed, failed = progress.failed, warning = progress.warning, cancelled = progress.cancelled, "C-MOVE done");
    progress.send_final(assoc, &req, rsp, None).await
}

/// The destination cannot be reached: nothing could be sent (A702, every instance failed).
/// The association to the Move Destination, over TLS for a peer with `tls = true`.
async fn connect(
    ctx: &Context,
    destination: &PeerConfig,
    options: ClientAssociationOptions<'_>,
) -> anyhow::Result<AsyncClientAssociation<TcpStream>> {
    let address = (destination.host.clone(), destination.port);
    if !destination.tls {
        return Ok(options.establish_async(address).await?);
    }
    let certificates = ctx.tls.as_ref().context("no [tls] certificate")?;
    let (local, accepted_from) = crate::tls::relay::outgoing(
        certificates.connector(),
        destination.host.clone(),
        destination.port,
        CONNECT_TIMEOUT,
    )
    .await?;
    let mut sub = options.establish_async(local).await?;
    // The relay takes the first connection to its loopback port: it must have been ours.
    let ours = sub.inner_stream().local_addr()?;
    if accepted_from.await.ok() != Some(ours) {
        let _ = sub.abort().await;
        anyhow::bail!("another local connection took the TLS relay to the move destination");
    }
    Ok(sub)
}

async fn unreachable_destination(
    assoc: &mut AsyncServerAssociation<TcpStream>,
    req: &Request,
    mut progress: Progress,
    instances: &[retrieve::Instance],
    why: &str,
) -> Result<(), ProtocolError> {
    tracing::warn!(error = %why, "C-MOVE destination unreachable");
    progress.fail_rest(instances);
    let comment = format!("cannot associate with the move destination: {why}");
    progress
        .send_final(assoc, req, field::C_MOVE_RSP, Some(&comment))
        .await
}
