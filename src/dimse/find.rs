//! C-FIND SCP (PS3.4 C.4.1) for the Patient Root and Study Root models.
//!
//! Matching keys go through the index's matching engine, and answers through its result layer
//! (`index::results`), the ones QIDO-RS uses; answers come from the index, never from object storage. Each matching row is sent as
//! a pending response as soon as the index yields it, and a C-CANCEL is looked for after each one.
//! Text is answered in UTF-8 (ISO_IR 192) when it needs more than ASCII, which (0008,0005) then says.

use dicom_core::header::Header;
use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemElement;
use dicom_object::InMemDicomObject;
use dicom_ul::association::server::AsyncServerAssociation;
use futures::TryStreamExt;
use sqlx::sqlite::SqliteRow;
use tokio::net::TcpStream;

use super::command::{elem, field};
use super::message::{self, cancel_requested, Inbox, ProtocolError};
use super::peers::{self, Right};
use super::qr::{self, status, Failure, Model, QrLevel, Request};
use super::{dataset, Context};
use crate::index::query::{vr_of, Query};
use crate::index::results::{self, Match, ResultLevel};
use crate::model::json::element_from_json;
use crate::model::levels::PATIENT_TAGS;
use crate::security::policy::Scope;
use crate::security::Action;

/// A C-FIND request, parsed.
struct Plan {
    level: QrLevel,
    query: Query,
    /// The keys asked for, in tag order, as sent (their VR is kept for empty answers).
    keys: Vec<InMemElement>,
    /// Some keys could not be matched on: pending responses say FF01.
    optional_keys_unsupported: bool,
    /// The identifier had (0008,0005): it is returned even when empty.
    charset_requested: bool,
}

fn plan(model: Model, identifier: &InMemDicomObject) -> Result<Plan, Failure> {
    let level = QrLevel::of(model, identifier)?;
    let mut query = Query::new(level.engine_level());
    let report = qr::add_keys(&mut query, identifier, |tag| {
        level != QrLevel::Patient || PATIENT_TAGS.contains(&tag)
    })?;
    let keys = identifier
        .iter()
        .filter(|e| {
            e.tag() != tags::SPECIFIC_CHARACTER_SET && e.tag() != tags::QUERY_RETRIEVE_LEVEL
        })
        .cloned()
        .collect();
    Ok(Plan {
        level,
        query,
        keys,
        optional_keys_unsupported: !report.unsupported.is_empty(),
        charset_requested: identifier.get(tags::SPECIFIC_CHARACTER_SET).is_some(),
    })
}

impl Plan {
    fn result_level(&self) -> ResultLevel {
        match self.level {
            QrLevel::Patient => ResultLevel::Patient,
            QrLevel::Study => ResultLevel::Study,
            QrLevel::Series => ResultLevel::Series,
            QrLevel::Image => ResultLevel::Instance,
        }
    }

    fn sql(&self) -> (String, Vec<crate::index::query::Arg>) {
        results::select_sql(self.result_level(), &self.query, true)
    }

    /// The response identifier for one row: the requested keys only, plus Query/Retrieve Level and
    /// Specific Character Set (when the text needs one, or it was asked for).
    fn identifier(&self, row: &SqliteRow, ae_title: &str) -> InMemDicomObject {
        let found = Match::from_row(self.result_level(), row, None);
        let mut out = InMemDicomObject::new_empty();
        out.put(DataElement::new(
            tags::QUERY_RETRIEVE_LEVEL,
            VR::CS,
            self.level.as_str(),
        ));
        for key in &self.keys {
            let tag = key.tag();
            let element = if tag == tags::RETRIEVE_AE_TITLE {
                DataElement::new(tag, VR::AE, ae_title)
            } else {
                found
                    .get(tag)
                    .and_then(|json| element_from_json(tag, json))
                    .unwrap_or_else(|| empty(tag, key.vr()))
            };
            out.put(element);
        }
        // Absent Specific Character Set means the default repertoire, unless it was asked for.
        if dataset::has_non_ascii_text(&out) {
            out.put(DataElement::new(
                tags::SPECIFIC_CHARACTER_SET,
                VR::CS,
                "ISO_IR 192",
            ));
        } else if self.charset_requested {
            out.put(DataElement::new(
                tags::SPECIFIC_CHARACTER_SET,
                VR::CS,
                PrimitiveValue::Empty,
            ));
        }
        out
    }
}

fn empty(tag: Tag, vr: VR) -> InMemElement {
    let vr = if vr == VR::UN { vr_of(tag) } else { vr };
    if vr == VR::SQ {
        DataElement::new(
            tag,
            vr,
            dicom_core::value::DataSetSequence::<InMemDicomObject>::empty(),
        )
    } else {
        DataElement::new(tag, vr, PrimitiveValue::Empty)
    }
}

/// Serves one C-FIND request until its final response.
pub async fn run(
    assoc: &mut AsyncServerAssociation<TcpStream>,
    ctx: &Context,
    req: Request,
    model: Model,
) -> Result<(), ProtocolError> {
    let final_response = |status: u16, comment: Option<&str>| {
        let mut b = qr::response(&req, field::C_FIND_RSP, status, false);
        if let Some(c) = comment {
            b = b.text(elem::ERROR_COMMENT, c);
        }
        b.encode()
    };
    if !peers::allowed(
        &ctx.config.peers,
        &req.calling_ae,
        req.peer.ip(),
        Right::Query,
    ) {
        tracing::warn!(target: "audit", calling_ae = %req.calling_ae, peer = %req.peer, "C-FIND refused: not a peer allowed to query");
        let comment = "calling AE title is not allowed to query";
        let rsp = final_response(status::NOT_AUTHORIZED, Some(comment));
        return message::send(assoc, req.pc, &rsp, None, req.write_timeout).await;
    }
    let parsed = dataset::decode(&req.identifier, &req.transfer_syntax)
        .map_err(|e| Failure::new(status::UNABLE_TO_PROCESS, format!("identifier: {e}")))
        .and_then(|identifier| plan(model, &identifier));
    let scoped = parsed.and_then(|mut plan| {
        // Only the studies the policy lets the caller search, in the SQL.
        if let Scope::Studies(filters) = req.scope(&ctx.policy, Action::Search)? {
            plan.query.within(&filters);
        }
        Ok(plan)
    });
    let plan = match scoped {
        Ok(plan) => plan,
        Err(f) => {
            tracing::warn!(calling_ae = %req.calling_ae, status = format!("{:04X}", f.status), comment = %f.comment, "C-FIND refused");
            let rsp = final_response(f.status, Some(&f.comment));
            return message::send(assoc, req.pc, &rsp, None, req.write_timeout).await;
        }
    };
    tracing::info!(target: "audit", calling_ae = %req.calling_ae, level = plan.level.as_str(), "C-FIND");
    let pending = if plan.optional_keys_unsupported {
        status::PENDING_OPTIONAL_KEYS_UNSUPPORTED
    } else {
        status::PENDING
    };
    let (sql, args) = plan.sql();
    let pool = ctx.index.read_pool();
    let query = crate::index::bind_args(sqlx::query(&sql), &args);
    let mut rows = query.fetch(pool);
    let mut inbox = Inbox::default();
    let mut matches = 0u64;
    let outcome = loop {
        let row = match rows.try_next().await {
            Ok(Some(row)) => row,
            Ok(None) => break Ok(false),
            Err(e) => {
                tracing::error!(error = %e, "C-FIND index read failed");
                break Err(Failure::new(status::OUT_OF_RESOURCES, "index read failed"));
            }
        };
        let identifier = plan.identifier(&row, &ctx.config.ae_title);
        // A match that cannot be encoded ends the search with a failure rather than vanish.
        let data = match dataset::encode(&identifier, &req.transfer_syntax) {
            Ok(data) => data,
            Err(e) => {
                tracing::error!(error = %e, "C-FIND identifier not encodable");
                break Err(Failure::new(status::UNABLE_TO_PROCESS, e));
            }
        };
        let command = qr::response(&req, field::C_FIND_RSP, pending, true).encode();
        message::send(assoc, req.pc, &command, Some(&data), req.write_timeout).await?;
        matches += 1;
        if cancel_requested(assoc, &mut inbox, req.message_id()).await? {
            break Ok(true);
        }
    };
    drop(rows);
    let rsp = match outcome {
        Ok(false) => final_response(status::SUCCESS, None),
        Ok(true) => {
            tracing::info!(calling_ae = %req.calling_ae, matches, "C-FIND cancelled");
            final_response(status::CANCEL, None)
        }
        Err(f) => final_response(f.status, Some(&f.comment)),
    };
    message::send(assoc, req.pc, &rsp, None, req.write_timeout).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identifier(pairs: &[(Tag, VR, &str)]) -> InMemDicomObject {
        InMemDicomObject::from_element_iter(
            pairs.iter().map(|(t, vr, v)| DataElement::new(*t, *vr, *v)),
        )
    }

    #[test]
    fn patient_level_matches_only_patient_attributes() {
        let p = plan(
            Model::PatientRoot,
            &identifier(&[
                (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "PATIENT"),
                (tags::PATIENT_NAME, VR::PN, "DOE*"),
                (tags::STUDY_DATE, VR::DA, "20200101"),
            ]),
        )
        .unwrap();
        assert!(p.optional_keys_unsupported);
        let (sql, args) = p.sql();
        assert!(sql.contains("GROUP BY st.patient_id"));
        assert!(sql.contains("st.patient_name LIKE"));
        assert!(!sql.contains("study_date"));
        assert_eq!(args.len(), 4);
        assert_eq!(p.keys.len(), 2);
    }

    #[test]
    fn universal_keys_are_return_keys_only() {
        let p = plan(
            Model::StudyRoot,
            &identifier(&[
                (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "SERIES"),
                (tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3"),
                (tags::MODALITY, VR::CS, ""),
                (tags::SERIES_INSTANCE_UID, VR::UI, ""),
            ]),
        )
        .unwrap();
        assert!(!p.optional_keys_unsupported);
        let (sql, _) = p.sql();
        assert!(sql.contains("WHERE st.study_uid IN (?)"));
        assert_eq!(p.keys.len(), 3);
    }
}
