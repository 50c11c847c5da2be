//! One association, from A-ASSOCIATE-AC to release or abort: P-DATA fragments are reassembled into
//! command sets and data sets (which may be split across any number of PDVs and PDUs) and dispatched
//! to the DIMSE services.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use dicom_ul::association::server::AsyncServerAssociation;
use dicom_ul::association::Association;
use dicom_ul::pdu::{AbortRQServiceProviderReason, AbortRQSource, PresentationContextResultReason};
use dicom_ul::Pdu;
use tokio::net::TcpStream;

use super::command::{elem, field, Command, CommandBuilder, MAX_COMMAND_LENGTH, NO_DATA_SET};
use super::dataset::MAX_IDENTIFIER_LENGTH;
use super::message::{self, ProtocolError};
use super::qr::{self, Request};
use super::receive::{receive, Incoming, Pdv};
use super::retrieve::OutContext;
use super::store::PendingStore;
use super::{stopped, Context};
use crate::security::Identity;

/// What the association is in the middle of receiving.
enum State {
    /// Between messages, or collecting command fragments.
    Command { pc: u8, buf: Vec<u8> },
    /// Receiving the data set of a C-STORE.
    StoreData { pc: u8, store: Box<PendingStore> },
    /// Receiving (and dropping) the data set of a command we do not serve.
    Discard { pc: u8, response: Vec<u8> },
    /// Receiving the identifier of a C-FIND, C-MOVE or C-GET.
    Identifier {
        pc: u8,
        cmd: Box<Command>,
        buf: Vec<u8>,
    },
}

/// What to do once a message is complete.
enum Action {
    Respond(u8, Vec<u8>),
    /// A query/retrieve operation, which runs on the association until its final response.
    Run(Box<Request>),
}

/// Serves an established association; `certificate` is the subject of the peer's verified TLS
/// client certificate.
pub async fn run(
    mut assoc: AsyncServerAssociation<TcpStream>,
    ctx: &Context,
    peer: std::net::SocketAddr,
    certificate: Option<String>,
) {
    let calling_ae = assoc.peer_ae_title().trim().to_string();
    let identity = Identity::dimse_peer(&calling_ae, peer.ip(), certificate);
    let contexts: HashMap<u8, OutContext> = assoc
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .map(|pc| {
            (
                pc.id,
                OutContext {
                    id: pc.id,
                    abstract_syntax: pc.abstract_syntax.trim_end_matches('\0').to_string(),
                    transfer_syntax: pc.transfer_syntax.trim_end_matches('\0').to_string(),
                },
            )
        })
        .collect();
    tracing::info!(
        %peer,
        calling_ae,
        certificate = identity.certificate.as_deref(),
        contexts = contexts.len(),
        "association accepted"
    );
    let mut conn = Connection {
        ctx,
        calling_ae: &calling_ae,
        peer,
        contexts,
        state: State::Command {
            pc: 0,
            buf: Vec::new(),
        },
    };
    let read_timeout = Duration::from_secs(ctx.config.read_timeout_secs);
    let message_timeout = Duration::from_secs(ctx.config.message_timeout_secs);
    let max_pdu_length = ctx.config.max_pdu_length;
    let mut shutdown = ctx.shutdown.clone();
    // When the message being received started: a peer that trickles it (a PDU now and then, each
    // in time) must still finish it within the message timeout.
    let mut message_started: Option<Instant> = None;
    loop {
        let wait = match message_started {
            Some(t) => read_timeout.min(message_timeout.saturating_sub(t.elapsed())),
            None => read_timeout,
        };
        let next = tokio::time::timeout(wait, receive(&mut assoc, max_pdu_length));
        let pdu = tokio::select! {
            received = next => match received {
                Err(_) if message_started.is_some_and(|t| t.elapsed() >= message_timeout) => {
                    Err(ProtocolError::MessageTimeout)
                }
                Err(_) => Err(ProtocolError::Timeout),
                Ok(result) => result,
            },
            // Between messages, a shutdown ends the association (receiving is cancel-safe); a
            // message in progress is received, answered, and only then is the association ended.
            _ = stopped(&mut shutdown), if message_started.is_none() => {
                Err(ProtocolError::ShuttingDown)
            }
        };
        let result = match pdu {
            Ok(Incoming::PData(pdvs)) => conn.on_pdata(&mut assoc, pdvs).await,
            Ok(Incoming::Other(Pdu::ReleaseRQ)) => {
                let _ = assoc.send(&Pdu::ReleaseRP).await;
                tracing::info!(calling_ae, "association released");
                return;
            }
            Ok(Incoming::Other(Pdu::AbortRQ { .. })) => Err(ProtocolError::Aborted),
            Ok(Incoming::Other(other)) => Err(ProtocolError::Violation(format!(
                "unexpected {}",
                other.short_description()
            ))),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            if matches!(e, ProtocolError::Aborted) {
                tracing::info!(calling_ae, "association aborted by peer");
                return;
            }
            tracing::warn!(calling_ae, error = %e, "aborting association");
            let reason = match e {
                ProtocolError::Network(_) => return,
                ProtocolError::ShuttingDown
                | ProtocolError::Timeout
                | ProtocolError::MessageTimeout => AbortRQServiceProviderReason::ReasonNotSpecified,
                _ => AbortRQServiceProviderReason::UnexpectedPdu,
            };
            let _ = assoc
                .send(&Pdu::AbortRQ {
                    source: AbortRQSource::ServiceProvider(reason),
                })
                .await;
            return;
        }
        if conn.between_messages() {
            message_started = None;
        } else if message_started.is_none() {
            message_started = Some(Instant::now());
        }
    }
}

struct Connection<'a> {
    ctx: &'a Context,
    calling_ae: &'a str,
    peer: std::net::SocketAddr,
    contexts: HashMap<u8, OutContext>,
    state: State,
}

impl Connection<'_> {
    async fn on_pdata(
        &mut self,
        assoc: &mut AsyncServerAssociation<TcpStream>,
        pdvs: Vec<Pdv>,
    ) -> Result<(), ProtocolError> {
        for pdv in pdvs {
            if !self.contexts.contains_key(&pdv.pc) {
                return Err(ProtocolError::Violation(format!(
                    "PDV on presentation context {} which was not accepted",
                    pdv.pc
                )));
            }
            match self.on_pdv(pdv).await? {
                None => {}
                Some(Action::Respond(pc, response)) => {
                    message::send(assoc, pc, &response, None, self.ctx.config.write_timeout())
                        .await?
                }
                Some(Action::Run(req)) => self.run_qr(assoc, *req).await?,
            }
        }
        Ok(())
    }

    /// Feeds one PDV; returns a response command to send when a message completes.
    async fn on_pdv(&mut self, pdv: Pdv) -> Result<Option<Action>, ProtocolError> {
        let pc = pdv.pc;
        match (&mut self.state, pdv.is_command) {
            (State::Command { pc: cur, buf }, true) => {
                if !buf.is_empty() && *cur != pc {
                    return Err(ProtocolError::Violation(
                        "command fragments on different presentation contexts".into(),
                    ));
                }
                *cur = pc;
                if buf.len() + pdv.data.len() > MAX_COMMAND_LENGTH {
                    return Err(ProtocolError::Violation("command set too long".into()));
                }
                buf.extend_from_slice(&pdv.data);
                if !pdv.is_last {
                    return Ok(None);
                }
                let bytes = std::mem::take(buf);
                let cmd =
                    Command::decode(&bytes).map_err(|e| ProtocolError::Violation(e.to_string()))?;
                self.on_command(pc, cmd).await
            }
            (State::StoreData { pc: cur, store }, false) if *cur == pc => {
                store.write(self.ctx, &pdv.data).await;
                if !pdv.is_last {
                    return Ok(None);
                }
                let State::StoreData { store, .. } = self.idle() else {
                    unreachable!()
                };
                Ok(Some(Action::Respond(
                    pc,
                    store.finish(self.ctx, self.calling_ae, self.peer).await,
                )))
            }
            (State::Discard { pc: cur, .. }, false) if *cur == pc => {
                if !pdv.is_last {
                    return Ok(None);
                }
                let State::Discard { response, .. } = self.idle() else {
                    unreachable!()
                };
                Ok(Some(Action::Respond(pc, response)))
            }
            (State::Identifier { pc: cur, buf, .. }, false) if *cur == pc => {
                if buf.len() + pdv.data.len() > MAX_IDENTIFIER_LENGTH {
                    return Err(ProtocolError::Violation("identifier too long".into()));
                }
                buf.extend_from_slice(&pdv.data);
                if !pdv.is_last {
                    return Ok(None);
                }
                let State::Identifier { cmd, buf, .. } = self.idle() else {
                    unreachable!()
                };
                Ok(Some(Action::Run(Box::new(Request {
                    pc,
                    transfer_syntax: self.contexts[&pc].transfer_syntax.clone(),
                    cmd: *cmd,
                    identifier: buf,
                    calling_ae: self.calling_ae.to_string(),
                    peer: self.peer,
                    write_timeout: self.ctx.config.write_timeout(),
                }))))
            }
            (State::Command { .. }, false) => Err(ProtocolError::Violation(
                "data set fragment without a command".into(),
            )),
            _ => Err(ProtocolError::Violation(
                "fragment of an unexpected type or presentation context".into(),
            )),
        }
    }

    /// No message is being received (a shutdown may end the association now).
    fn between_messages(&self) -> bool {
        matches!(&self.state, State::Command { buf, .. } if buf.is_empty())
    }

    fn idle(&mut self) -> State {
        std::mem::replace(
            &mut self.state,
            State::Command {
                pc: 0,
                buf: Vec::new(),
            },
        )
    }

    async fn on_command(&mut self, pc: u8, cmd: Command) -> Result<Option<Action>, ProtocolError> {
        let command_field = cmd
            .command_field()
            .map_err(|e| ProtocolError::Violation(e.to_string()))?;
        let context = &self.contexts[&pc];
        match command_field {
            field::C_ECHO_RQ => Ok(Some(Action::Respond(pc, super::echo::response(&cmd)))),
            field::C_STORE_RQ if cmd.has_data_set() => {
                let store = PendingStore::begin(
                    self.ctx,
                    &cmd,
                    &context.abstract_syntax,
                    &context.transfer_syntax,
                    self.calling_ae,
                    self.peer.ip(),
                )
                .await;
                self.state = State::StoreData {
                    pc,
                    store: Box::new(store),
                };
                Ok(None)
            }
            field::C_STORE_RQ => Err(ProtocolError::Violation(
                "C-STORE-RQ without a data set".into(),
            )),
            field::C_FIND_RQ | field::C_MOVE_RQ | field::C_GET_RQ if cmd.has_data_set() => {
                self.state = State::Identifier {
                    pc,
                    cmd: Box::new(cmd),
                    buf: Vec::new(),
                };
                Ok(None)
            }
            field::C_FIND_RQ | field::C_MOVE_RQ | field::C_GET_RQ => Err(ProtocolError::Violation(
                "query/retrieve request without an identifier".into(),
            )),
            // C-CANCEL has no response; one that arrives after its operation ended is moot.
            field::C_CANCEL_RQ => Ok(None),
            other => {
                // PS3.7 C.5: an operation we do not provide gets "unrecognized operation".
                let response = CommandBuilder::new()
                    .uid(
                        elem::AFFECTED_SOP_CLASS_UID,
                        &cmd.string(elem::AFFECTED_SOP_CLASS_UID).unwrap_or_default(),
                    )
                    .u16(elem::COMMAND_FIELD, other | 0x8000)
                    .u16(
                        elem::MESSAGE_ID_BEING_RESPONDED_TO,
                        cmd.message_id().unwrap_or(0),
                    )
                    .u16(elem::COMMAND_DATA_SET_TYPE, NO_DATA_SET)
                    .u16(elem::STATUS, 0x0211)
                    .encode();
                if cmd.has_data_set() {
                    self.state = State::Discard { pc, response };
                    Ok(None)
                } else {
                    Ok(Some(Action::Respond(pc, response)))
                }
            }
        }
    }

    /// Runs a C-FIND, C-MOVE or C-GET to its final response. A SOP class that is not a Patient or
    /// Study Root model of that operation gets 0122.
    async fn run_qr(
        &mut self,
        assoc: &mut AsyncServerAssociation<TcpStream>,
        req: Request,
    ) -> Result<(), ProtocolError> {
        let command_field = req.cmd.command_field().unwrap_or(0);
        let sop_class = req.sop_class();
        let model = qr::model_of(&sop_class)
            .filter(|_| qr::operation_of(&sop_class) == Some(command_field));
        let Some(model) = model else {
            let rsp = qr::response(
                &req,
                command_field | 0x8000,
                qr::status::SOP_CLASS_NOT_SUPPORTED,
                false,
            )
            .text(
                elem::ERROR_COMMENT,
                &format!("SOP class {sop_class} is not supported for this operation"),
            )
            .encode();
            return message::send(assoc, req.pc, &rsp, None, req.write_timeout).await;
        };
        match command_field {
            field::C_FIND_RQ => super::find::run(assoc, self.ctx, req, model).await,
            field::C_MOVE_RQ => super::move_::run(assoc, self.ctx, req, model).await,
            _ => super::get::run(assoc, self.ctx, req, model, &self.contexts).await,
        }
    }
}
