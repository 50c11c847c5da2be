//! Entry points for the fuzz targets in `fuzz/` (built only with `--cfg fuzzing`, as `cargo fuzz`
//! does): each takes arbitrary bytes to one parser of hostile input and must return, never panic,
//! hang or allocate without bound (libFuzzer's `-rss_limit_mb` and `-malloc_limit_mb` catch that).

use bytes::{Bytes, BytesMut};

use crate::index::query::Level;

/// PDUs as they arrive on an association: P-DATA-TF split into PDVs, the rest through dicom-ul.
pub fn pdu_reader(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = crate::dimse::receive::parse(&mut buf, crate::config::MAX_PDU_LENGTH) {}
}

/// An A-ASSOCIATE-RQ as the listener reads it before dicom-ul negotiates.
pub fn associate_request(data: &[u8]) {
    let config = crate::config::DimseConfig::default();
    let _ = crate::dimse::negotiation::proposal(data, crate::config::MAX_PDU_LENGTH, &config);
}

/// A DIMSE command set and the fields every handler reads from it.
pub fn command(data: &[u8]) {
    if let Ok(cmd) = crate::dimse::command::Command::decode(data) {
        let _ = cmd.command_field();
        let _ = cmd.message_id();
        let _ = cmd.has_data_set();
        let _ = cmd.string(0x0002);
    }
}

/// A Part-10 object through everything ingest does before and while parsing it: the file meta
/// group, the walk that checks every length before dicom-rs parses, the bulk-data plan, dicom-rs's
/// parse of the header, the frame layout; and the early header read from its first bytes.
pub fn part10_object(data: &[u8]) {
    let _ = crate::dicom::walk_part10(data);
    crate::ingest::parse_for_fuzzing(data);
}

/// A deflated data set (Deflated Explicit VR Little Endian): measured, then walked inflated.
pub fn deflated_dataset(data: &[u8]) {
    let _ = crate::dicom::walk_deflated(data);
    let mut object = Vec::with_capacity(data.len() + 256);
    object.extend_from_slice(&[0u8; 128]);
    object.extend_from_slice(b"DICM");
    let ts = b"1.2.840.10008.1.2.1.99";
    object.extend_from_slice(&[0x02, 0x00, 0x10, 0x00, b'U', b'I']);
    object.extend_from_slice(&(ts.len() as u16).to_le_bytes());
    object.extend_from_slice(ts);
    object.extend_from_slice(data);
    crate::ingest::parse_for_fuzzing(&object);
}

/// A STOW-RS request body: the first line is the Content-Type's boundary parameter, the rest the body,
/// fed in chunks of varying sizes so that delimiters fall across reads.
pub fn multipart_related(data: &[u8]) {
    let Some(split) = data.iter().position(|&b| b == b'\n') else {
        return;
    };
    let boundary = String::from_utf8_lossy(&data[..split]).into_owned();
    let _ = crate::dicomweb::stow::multipart_reader::parse_related(&format!(
        "multipart/related; type=\"application/dicom\"; boundary={boundary}"
    ));
    let body = &data[split + 1..];
    let sizes = [1usize, 7, 64, 3, 4096];
    let mut chunks = Vec::new();
    let (mut at, mut i) = (0, 0);
    while at < body.len() {
        let end = (at + sizes[i % sizes.len()]).min(body.len());
        chunks.push(Ok::<_, std::io::Error>(Bytes::copy_from_slice(
            &body[at..end],
        )));
        at = end;
        i += 1;
    }
    let stream = futures::stream::iter(chunks);
    let mut reader =
        crate::dicomweb::stow::multipart_reader::MultipartReader::new(stream, &boundary, 1 << 20);
    futures::executor::block_on(async {
        while let Ok(Some(_)) = reader.next_part().await {
            while let Ok(Some(_)) = reader.next_chunk().await {}
        }
    });
}

/// A QIDO-RS query string at every level, down to the SQL the matching engine builds from it.
pub fn qido_query(data: &[u8]) {
    let query = String::from_utf8_lossy(data);
    for level in [Level::Study, Level::Series, Level::Instance] {
        crate::dicomweb::qido_sql_for_fuzzing(level, &query);
    }
}

/// A bearer token (before the first newline) and a JWKS document (after it): the token's segments and
/// header, the key set, and the signature check against its keys.
pub fn jwt(data: &[u8]) {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let keys: Vec<_> = crate::security::jwks::parse(data.get(split + 1..).unwrap_or_default())
        .unwrap_or_default()
        .into_iter()
        .map(|(_, key)| key)
        .collect();
    let token = String::from_utf8_lossy(&data[..split]);
    if let Ok(token) = crate::security::jwt::Token::parse(&token) {
        let _ = token.verify(&keys);
    }
}
