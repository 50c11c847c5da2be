//! C-GET SCP (PS3.4 C.4.3): the instances an identifier names are sent as C-STORE sub-operations
//! over the requesting association itself, on the Storage presentation contexts it proposed (with
//! the SCP role for itself, accepted in negotiation). Counting, statuses and cancel as for C-MOVE.

use std::collections::HashMap;
use std::time::Duration;

use dicom_ul::association::server::AsyncServerAssociation;
use tokio::net::TcpStream;

use super::audited;
use super::command::field;
use super::message::{self, Inbox, ProtocolError};
use super::peers::{self, Right};
use super::qr::{status, Failure, Model, Request};
use super::retrieve::{self, OutContext, Progress, SubOpError};
use super::Context;
use crate::audit::{Action, Outcome};

pub async fn run(
    assoc: &mut AsyncServerAssociation<TcpStream>,
    ctx: &Context,
    req: Request,
    model: Model,
    contexts: &HashMap<u8, OutContext>,
) -> Result<(), ProtocolError> {
    let rsp = field::C_GET_RSP;
    if !peers::allowed(
        &ctx.config.peers,
        &req.calling_ae,
        req.peer.ip(),
        Right::Retrieve,
    ) {
        audited::record(ctx, &req, Action::PolicyDenial, Outcome::MinorFailure, 0);
        let f = Failure::new(
            status::NOT_AUTHORIZED,
            "calling AE title is not allowed to retrieve",
        );
        return retrieve::send_refusal(assoc, &req, rsp, &f).await;
    }
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
    let mut contexts: Vec<OutContext> = contexts.values().cloned().collect();
    contexts.sort_by_key(|c| c.id);
    let mut progress = Progress::new(instances.len());
    let pending_interval = Duration::from_millis(ctx.config.retrieve_pending_interval_ms);
    let mut inbox = Inbox::default();
    let mut read_ahead =
        retrieve::ReadAhead::new(ctx, &contexts, message::pdv_limit(assoc), &instances);
    for (n, inst) in instances.iter().enumerate() {
        if progress.cancelled
            || message::cancel_requested(assoc, &mut inbox, req.message_id()).await?
        {
            progress.cancelled = true;
            break;
        }
        // Sub-operation message IDs count down from the top, away from the requester's own IDs.
        let message_id = 0xFFFF - (n % 0x7FFF) as u16;
        let outcome = match read_ahead.take().await {
            Ok(prepared) => {
                retrieve::store(
                    assoc,
                    &mut inbox,
                    ctx,
                    inst,
                    prepared,
                    message_id,
                    None,
                    &mut progress,
                    Some(req.message_id()),
                )
                .await
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(store_status) => progress.record(inst, Some(store_status)),
            Err(SubOpError::Failed(why)) => {
                tracing::warn!(sop_instance_uid = %inst.sop_instance_uid, error = %why, "C-GET sub-operation failed");
                progress.record(inst, None);
            }
            // The requesting association itself is broken: nothing more can be said on it.
            Err(SubOpError::Protocol(e)) => return Err(e),
        }
        if progress.pending_due(pending_interval) {
            progress.send_pending(assoc, &req, rsp).await?;
        }
    }
    tracing::info!(calling_ae = %req.calling_ae, completed = progress.completed, failed = progress.failed, warning = progress.warning, cancelled = progress.cancelled, "C-GET done");
    progress.send_final(assoc, &req, rsp, None).await
}
